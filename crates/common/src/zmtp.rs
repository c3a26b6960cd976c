//! Raw ZMTP 3 bytes, as a peer that bypasses the library writes them: the lab's wire fuzzer and
//! the tests that throw bad input at the roles build their connections from these.

/// The 64-byte ZMTP 3.0 greeting with the NULL mechanism, as any peer sends first.
pub fn greeting() -> Vec<u8> {
    let mut g = vec![0u8; 64];
    g[0] = 0xFF;
    g[9] = 0x7F;
    g[10] = 3;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// One frame: flags (LONG added when the body needs it), size, body.
pub fn frame(flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(body.len() + 9);
    match u8::try_from(body.len()) {
        Ok(short) => f.extend([flags, short]),
        Err(_) => {
            f.push(flags | 0x02);
            f.extend((body.len() as u64).to_be_bytes());
        }
    }
    f.extend(body);
    f
}

/// The READY command of a `socket_type` peer (`Socket-Type` property only).
pub fn ready(socket_type: &str) -> Vec<u8> {
    ready_as(socket_type, None)
}

/// READY with `Socket-Type` and, if given, the `Identity` property (a ROUTER's routing id for
/// this peer): how a peer claims an id, another's included.
pub fn ready_as(socket_type: &str, identity: Option<&[u8]>) -> Vec<u8> {
    let mut body = vec![5u8];
    body.extend(b"READY");
    let mut property = |name: &str, value: &[u8]| {
        body.push(name.len() as u8);
        body.extend(name.as_bytes());
        body.extend((value.len() as u32).to_be_bytes());
        body.extend(value);
    };
    property("Socket-Type", socket_type.as_bytes());
    if let Some(identity) = identity {
        property("Identity", identity);
    }
    frame(0x04, &body)
}

/// A frame header announcing a 1 TiB frame: nine bytes that make a bare zmq.rs process abort
/// on allocation, before any handshake.
pub fn huge_header() -> Vec<u8> {
    let mut h = vec![0x02];
    h.extend((1u64 << 40).to_be_bytes());
    h
}

/// What a guarded socket must cut off, named: the huge header with and without a greeting, a
/// 100 kB frame (over a 64 KiB limit), and 5,000 empty frames with MORE set.
pub fn attacks() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("nine bytes, no greeting", huge_header()),
        (
            "nine bytes after the greeting",
            [greeting(), huge_header()].concat(),
        ),
        ("one frame over the limit", {
            let mut s = greeting();
            s.push(0x02);
            s.extend(100_000u64.to_be_bytes());
            s.extend(vec![0u8; 1000]);
            s
        }),
        ("empty frames with MORE", {
            let mut s = greeting();
            for _ in 0..5000 {
                s.extend([0x01, 0x00]);
            }
            s
        }),
    ]
}

/// Connects to `endpoint` (`tcp://host:port`), writes `bytes` and reads until the other side
/// closes or 5 s pass. False if it could not connect. Blocking: for tests and tools.
pub fn send_raw(endpoint: &str, bytes: &[u8]) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(endpoint.trim_start_matches("tcp://")) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    if stream.write_all(bytes).is_err() {
        return true;
    }
    // The server's greeting may come first; a cut-off connection then reads 0 or fails.
    let mut sink = [0u8; 1024];
    while let Ok(n) = stream.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    true
}
