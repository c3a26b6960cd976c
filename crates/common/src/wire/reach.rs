//! Why a write to a peer is not going through, as the kernel sees it (`TCP_INFO`): the peer is
//! still taking bytes (slowly), it stopped reading (its kernel acknowledges, with a zero window),
//! or it cannot be reached (nothing is acknowledged: a partition, a host gone).
//!
//! The difference decides whether a cut helps. A peer that stopped reading learns of a cut as
//! soon as it reads again, and a stock SUB or PULL then reconnects. An unreachable one never
//! learns of it: a SUB or PULL sends nothing, so after the partition heals it would keep a dead
//! connection for good. Kept, the connection carries on when the link heals, as libzmq's do.

use std::os::fd::AsRawFd;

/// What [`Watch::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Bytes were acknowledged since the last check: the peer reads, slowly.
    Taking,
    /// Nothing acknowledged since the last check, but the peer's kernel answers: it stopped
    /// reading.
    Stopped,
    /// Nothing acknowledged and the peer's kernel does not answer: retransmissions or window
    /// probes go unanswered.
    Unreachable,
}

/// Follows one connection's acknowledged bytes between checks.
#[derive(Debug)]
pub struct Watch {
    acked: u64,
}

impl Watch {
    /// Starts from what `socket` has acknowledged so far.
    pub fn new(socket: &impl AsRawFd) -> Self {
        Self {
            acked: tcp_info(socket).map_or(0, |info| info.tcpi_bytes_acked),
        }
    }

    /// Compares the connection's state with the last check's. An error reading it counts as
    /// [`Reach::Stopped`], the judgement that ends the connection.
    pub fn check(&mut self, socket: &impl AsRawFd) -> Reach {
        let Some(info) = tcp_info(socket) else {
            return Reach::Stopped;
        };
        let acked = std::mem::replace(&mut self.acked, info.tcpi_bytes_acked);
        if info.tcpi_bytes_acked > acked {
            Reach::Taking
        } else if info.tcpi_retransmits == 0 && info.tcpi_probes <= 1 {
            // Every probe of a zero window is acknowledged (which resets the count), and no
            // data waits for an acknowledgement.
            Reach::Stopped
        } else {
            Reach::Unreachable
        }
    }
}

#[allow(unsafe_code)] // neither nix nor socket2 reads TCP_INFO
fn tcp_info(socket: &impl AsRawFd) -> Option<nix::libc::tcp_info> {
    use nix::libc;
    // SAFETY: `tcp_info` is plain data (zeroes are a valid value), and getsockopt writes at
    // most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: as above; the descriptor is borrowed for the call.
    let done = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (done == 0).then_some(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    /// A peer that never reads: once both buffers are full, nothing more is acknowledged, but
    /// its kernel answers the window probes: `Stopped`, never `Unreachable`.
    #[test]
    fn a_peer_that_does_not_read_is_stopped_not_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut ours =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (_theirs, _) = listener.accept().expect("accept");
        ours.set_nonblocking(true).expect("nonblocking");
        let mut watch = Watch::new(&ours);
        assert_eq!(watch.check(&ours), Reach::Stopped, "nothing sent yet");
        let chunk = vec![0u8; 64 * 1024];
        while ours.write(&chunk).is_ok() {}
        assert_eq!(watch.check(&ours), Reach::Taking, "the buffers took bytes");
        // What the send buffer still held drains into the peer's receive buffer, then stops.
        std::thread::sleep(Duration::from_millis(300));
        watch.check(&ours);
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(watch.check(&ours), Reach::Stopped);
        }
    }
}
