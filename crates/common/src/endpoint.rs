//! Endpoints: validation of user input and the bound side of every socket.
//!
//! Servers bind through [`bind_keepalive`] so that a peer that vanished behind a partition, or
//! stopped reading, is dropped by the kernel after a few seconds instead of holding queued
//! messages for minutes.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

/// Why an endpoint given by a user cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("endpoint {0:?} must look like tcp://HOST:PORT")]
    Syntax(String),
    #[error("endpoint {0:?} names no address")]
    Unresolved(String),
    #[error("cannot bind {endpoint}")]
    Bind {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `text` is a `tcp://host:port` endpoint (host may be `*`), for clap.
pub fn parse_tcp(text: &str) -> Result<String, EndpointError> {
    split_tcp(text)?;
    Ok(text.to_string())
}

fn split_tcp(text: &str) -> Result<(&str, u16), EndpointError> {
    let rest = text
        .strip_prefix("tcp://")
        .ok_or_else(|| EndpointError::Syntax(text.to_string()))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| EndpointError::Syntax(text.to_string()))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| EndpointError::Syntax(text.to_string()))?;
    if host.is_empty() {
        return Err(EndpointError::Syntax(text.to_string()));
    }
    Ok((host, port))
}

/// Resolves `tcp://host:port` to a socket address (`*` means all interfaces).
pub fn resolve(text: &str) -> Result<SocketAddr, EndpointError> {
    let (host, port) = split_tcp(text)?;
    let host = match host {
        "*" => "0.0.0.0",
        h => h.trim_start_matches('[').trim_end_matches(']'),
    };
    (host, port)
        .to_socket_addrs()
        .map_err(|_| EndpointError::Unresolved(text.to_string()))?
        .next()
        .ok_or_else(|| EndpointError::Unresolved(text.to_string()))
}

/// Binds a TCP listener whose accepted connections carry TCP keepalive (`idle` before the first
/// probe, then one probe per `idle`, three probes) and a `TCP_USER_TIMEOUT` of four `idle`s,
/// ready for `Socket::bind_listener`.
///
/// Keepalive alone is not enough: Linux sends no probes while data is unacknowledged, and a
/// server nearly always has some in flight to a cut-off peer (heartbeats, replies), so such a
/// connection would live until retransmissions give up (about 15 minutes). The user timeout
/// aborts a connection whose sent data stays unacknowledged, or whose peer keeps a zero window
/// (it stopped reading), for that long.
pub fn bind_keepalive(text: &str, idle: Duration) -> Result<TcpListener, EndpointError> {
    let addr = resolve(text)?;
    let bind_err = |source| EndpointError::Bind {
        endpoint: text.to_string(),
        source,
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(bind_err)?;
    socket.set_reuse_address(true).map_err(bind_err)?;
    let keepalive = TcpKeepalive::new()
        .with_time(idle)
        .with_interval(idle)
        .with_retries(3);
    // Accepted sockets inherit keepalive settings from the listener on Linux.
    socket.set_tcp_keepalive(&keepalive).map_err(bind_err)?;
    socket
        .set_tcp_user_timeout(Some(user_timeout(idle)))
        .map_err(bind_err)?;
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.listen(1024).map_err(bind_err)?;
    Ok(socket.into())
}

/// Binds a TCP listener for peers that may never send (a SUB, a PULL): such a peer cannot learn
/// of a cut made while it was unreachable, so nothing here ends a connection for being silent
/// during a partition. No `TCP_USER_TIMEOUT`: unacknowledged data is retransmitted until the
/// kernel gives up (`tcp_retries2`, about 15 minutes), and the connection carries on when the link
/// heals. Keepalive ([`PATIENT_KEEPALIVE`] before the first probe, then six probes 10 s apart)
/// releases an idle connection whose peer is gone for good. A peer that stopped reading (its
/// kernel still acknowledges) is the server's to judge: see [`crate::wire::server::Options`].
pub fn bind_patient(text: &str) -> Result<TcpListener, EndpointError> {
    let addr = resolve(text)?;
    let bind_err = |source| EndpointError::Bind {
        endpoint: text.to_string(),
        source,
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(bind_err)?;
    socket.set_reuse_address(true).map_err(bind_err)?;
    let keepalive = TcpKeepalive::new()
        .with_time(PATIENT_KEEPALIVE)
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    socket.set_tcp_keepalive(&keepalive).map_err(bind_err)?;
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.listen(1024).map_err(bind_err)?;
    Ok(socket.into())
}

/// How long a connection of [`bind_patient`] may be idle before keepalive probes its peer.
pub const PATIENT_KEEPALIVE: Duration = Duration::from_secs(60);

/// How long a bound socket's connection may leave data unacknowledged before the kernel aborts
/// it: the time keepalive takes to give up on an idle peer (one idle period, three probes).
pub fn user_timeout(idle: Duration) -> Duration {
    idle * 4
}

/// Raises this process's soft limit on open files to its hard limit (as Go's runtime does at
/// start), and returns the limit now in force. A server's peers each take a descriptor; the
/// usual soft limit of 1,024 is a leftover of `select()`, which nothing here uses.
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// A default bound on the connections of each of `sockets` server sockets sharing this
/// process's open-files limit `open_files`: the limit less 64 descriptors for everything else,
/// split evenly, between 16 and 65,536 per socket. (With the limit at 256 and two sockets:
/// 96 each.)
pub fn max_connections_for(open_files: u64, sockets: u64) -> usize {
    let share = open_files.saturating_sub(64) / sockets.max(1);
    share.clamp(16, 65_536) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_tcp_endpoints() {
        assert!(parse_tcp("tcp://127.0.0.1:5559").is_ok());
        assert!(parse_tcp("tcp://*:0").is_ok());
        assert!(parse_tcp("tcp://localhost:1").is_ok());
    }

    #[test]
    fn rejects_malformed_endpoints() {
        for bad in [
            "127.0.0.1:5",
            "tcp://:5",
            "tcp://host",
            "tcp://h:99999",
            "ipc://x",
        ] {
            assert!(parse_tcp(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn keepalive_listener_binds_port_zero() {
        let listener = bind_keepalive("tcp://127.0.0.1:0", Duration::from_secs(1)).expect("bind");
        assert_ne!(listener.local_addr().expect("addr").port(), 0);
        let socket = socket2::SockRef::from(&listener);
        assert_eq!(
            socket.tcp_user_timeout().expect("user timeout"),
            Some(Duration::from_secs(4))
        );
    }
}
