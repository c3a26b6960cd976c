//! Cutting subscribers that stopped reading, which zmq.rs's XPUB would otherwise wait on.
//!
//! XPUB `send()` writes to each matching subscriber in turn and waits while one's kernel send
//! buffer is full. `TCP_USER_TIMEOUT` was meant to make the kernel abort such a connection,
//! but measured on loopback it did not cut a SIGSTOPped zmq.rs subscriber in 9 s (it did cut a
//! libzmq one with a tiny receive buffer). So when a send has waited `stall_timeout`, the
//! proxy looks up its own connections on the XPUB port in `/proc/net/tcp{,6}`, and shuts down
//! (`shutdown(2)`) each whose send queue holds at least [`MIN_QUEUE`] bytes: the waiting write
//! fails with `EPIPE`, the XPUB drops that peer, and the send completes for everyone else.
//! Linux only; elsewhere nothing is found and the send waits as before.

use std::collections::HashSet;
use std::os::fd::RawFd;

/// A connection with this many bytes unacknowledged or unsent after a stall is taken for a
/// subscriber that stopped reading (a reading one keeps its queue near empty).
pub const MIN_QUEUE: u64 = 64 * 1024;

/// One connection of the proxy's, as `/proc/net/tcp` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    pub local_port: u16,
    pub remote: String,
    pub established: bool,
    pub tx_queue: u64,
    pub inode: u64,
}

/// Parses one line of `/proc/net/tcp` or `/proc/net/tcp6` (`None` for the header).
pub fn parse_line(line: &str) -> Option<Conn> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 {
        return None;
    }
    let (_, local_port) = fields[1].rsplit_once(':')?;
    let (tx, _) = fields[4].split_once(':')?;
    Some(Conn {
        local_port: u16::from_str_radix(local_port, 16).ok()?,
        remote: fields[2].to_string(),
        established: fields[3] == "01",
        tx_queue: u64::from_str_radix(tx, 16).ok()?,
        inode: fields[9].parse().ok()?,
    })
}

/// Established connections on `port` with at least `min_queue` bytes queued to send.
pub fn stalled(table: &str, port: u16, min_queue: u64) -> Vec<Conn> {
    table
        .lines()
        .filter_map(parse_line)
        .filter(|c| c.established && c.local_port == port && c.tx_queue >= min_queue)
        .collect()
}

/// This process's file descriptors that are the sockets with these inodes.
fn fds_of(inodes: &HashSet<u64>) -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|entry| {
            let fd: RawFd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            inodes.contains(&inode).then_some(fd)
        })
        .collect()
}

/// Shuts down every connection on `port` whose send queue is at least `min_queue`; returns
/// how many were cut.
pub fn cut_stalled(port: u16, min_queue: u64) -> usize {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            found.extend(stalled(&text, port, min_queue));
        }
    }
    if found.is_empty() {
        return 0;
    }
    let inodes: HashSet<u64> = found.iter().map(|c| c.inode).collect();
    let mut cut = 0;
    for fd in fds_of(&inodes) {
        match nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both) {
            Ok(()) => cut += 1,
            Err(e) => tracing::warn!(fd, error = %e, "cannot cut a stalled subscriber"),
        }
    }
    for c in &found {
        tracing::warn!(remote = %c.remote, queued = c.tx_queue, "subscriber stopped reading: cut");
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:15B4 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:15B4 0100007F:D431 01 003A0000:00000000 01:00000014 00000000     0        0 1002 1 0000000000000000 20 4 1 10 -1
   2: 0100007F:15B4 0100007F:D432 01 00000010:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 20 4 1 10 -1
   3: 0100007F:15B3 0100007F:D433 01 003A0000:00000000 01:00000014 00000000     0        0 1004 1 0000000000000000 20 4 1 10 -1
";

    #[test]
    fn finds_only_full_established_connections_on_the_port() {
        let found = stalled(TABLE, 0x15B4, MIN_QUEUE);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].inode, 1002);
        assert_eq!(found[0].tx_queue, 0x3A0000);
        assert!(parse_line("  sl  local_address").is_none());
    }

    #[test]
    fn finds_a_real_connection_that_stopped_reading() {
        // A listener whose accepted side is written to and never read from.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        server.set_nonblocking(true).expect("nonblocking");
        let chunk = vec![0u8; 64 * 1024];
        while std::io::Write::write(&mut server, &chunk).is_ok() {}
        let table = std::fs::read_to_string("/proc/net/tcp").expect("linux");
        assert_eq!(stalled(&table, port, MIN_QUEUE).len(), 1);
        assert_eq!(cut_stalled(port, MIN_QUEUE), 1);
        let err = std::io::Write::write(&mut server, &chunk).expect_err("cut");
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
        drop(client);
    }
}
