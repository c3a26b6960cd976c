//! The guard in front of every socket of the master (`--guard always`): the nine bytes that
//! abort a bare zmq.rs process, an oversized frame and an empty-frame MORE flood are cut off and
//! counted on the task, result and control endpoints alike, and a real inline batch (image bytes
//! both ways through the guards) completes afterwards. Without the guard the same nine bytes
//! abort the master on each of them.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write;
use std::net::TcpStream;

use common::zmtp::{self, greeting, huge_header as nine_bytes, send_raw};

use support::*;

#[test]
fn the_guard_cuts_off_bad_peers_on_every_master_socket_and_the_batch_completes() {
    let dir = Scratch::new("guard");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 8, 48);
    let (mut m, connect) = master(
        &input,
        &output,
        &[
            "--filter",
            "invert",
            "--stop-workers",
            "--guard",
            "always",
            "--transfer",
            "inline",
            "--max-message-bytes",
            "65536",
            "--max-image-bytes",
            "60000",
        ],
    );
    let endpoints: Vec<&str> = connect.split(',').collect();
    assert_eq!(endpoints.len(), 3, "{connect}");
    for endpoint in &endpoints {
        for (what, bytes) in zmtp::attacks() {
            assert!(
                send_raw(endpoint, &bytes),
                "{what}: cannot reach {endpoint}"
            );
        }
    }
    let mut w = worker(&connect, "w1", &[]);
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let s = m.summary();
    assert_eq!(
        (count(&s, "total"), count(&s, "done"), count(&s, "failed")),
        (8, 8, 0),
        "{s}"
    );
    assert_eq!(count(&s, "guard_refused"), 12, "every attack cut off: {s}");
    assert_eq!(count(&s, "guard_stalled"), 0, "{s}");
    assert_outputs(&output, &expected);
    assert_eq!(
        m.stderr().matches("peer cut off").count(),
        12,
        "each logged once"
    );
    assert!(w.wait().success(), "worker did not obey stop");
}

/// Without the guard the same nine bytes abort the master, whichever socket gets them: the
/// attack is real, and the test above would fail if a guard let it through.
#[test]
fn without_the_guard_nine_bytes_abort_the_master_on_each_socket() {
    let dir = Scratch::new("unguarded");
    let (input, output) = (dir.path("in"), dir.path("out"));
    samples(&input, 1, 16);
    for which in 0..3 {
        let (mut m, connect) = master(&input, &output, &["--guard", "never"]);
        let endpoint = connect.split(',').nth(which).unwrap().to_string();
        send_raw(&endpoint, &[greeting(), nine_bytes()].concat());
        let status = m.wait();
        assert!(
            !status.success(),
            "a bare zmq.rs survived on {endpoint}: {status:?}"
        );
    }
}

/// A fake worker that says hello with 100 free slots on the result endpoint, connects a PULL to
/// the task endpoint and never reads it: behind the guard, the inline tasks dealt to it pile up
/// (past the kernel's socket buffers, a few MB on loopback) to `--max-peer-bytes` (4 MiB here),
/// then it is cut off (`guard_stalled`); its tasks go unacknowledged and are re-sent, and a
/// real worker that comes then finishes the batch.
#[test]
fn a_worker_that_never_reads_its_tasks_is_cut_at_max_peer_bytes() {
    let dir = Scratch::new("guard-stalled");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 24, 800);
    let (mut m, connect) = master(
        &input,
        &output,
        &[
            "--filter",
            "invert",
            "--stop-workers",
            "--guard",
            "always",
            "--transfer",
            "inline",
            "--max-peer-bytes",
            "4194304",
        ],
    );
    let endpoints: Vec<&str> = connect.split(',').collect();
    let handshake = |socket_type: &[u8]| {
        let mut ready = vec![5u8];
        ready.extend(b"READY");
        ready.push(11);
        ready.extend(b"Socket-Type");
        ready.extend((socket_type.len() as u32).to_be_bytes());
        ready.extend(socket_type);
        let mut h = greeting();
        h.extend([0x04, ready.len() as u8]);
        h.extend(ready);
        h
    };
    // The task PULL, with a small receive buffer, never read.
    let socket = socket2_free_pull(endpoints[0]);
    let mut tasks = socket;
    tasks.write_all(&handshake(b"PULL")).unwrap();
    // The hello, on a PUSH to the result endpoint.
    let hello = br#"{"type":"hello","worker":"rogue","slots":100,"free":100,"heartbeat_ms":60000}"#;
    let mut results = TcpStream::connect(endpoints[1].trim_start_matches("tcp://")).unwrap();
    let mut bytes = handshake(b"PUSH");
    bytes.extend([0x00, hello.len() as u8]);
    bytes.extend(hello);
    results.write_all(&bytes).unwrap();
    // Every task goes to the rogue (the only task connection) until the guard cuts it off;
    // then a real worker comes.
    let rogue = format!("peer={}", tasks.local_addr().unwrap());
    let cut = |log: String| {
        log.lines()
            .any(|l| l.contains(&rogue) && l.contains("waiting for the peer to read"))
    };
    wait_until("the rogue cut off", || cut(m.stderr()));
    let mut w = worker(&connect, "w1", &[]);
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let s = m.summary();
    assert_eq!(
        (count(&s, "total"), count(&s, "done"), count(&s, "failed")),
        (24, 24, 0),
        "{s}"
    );
    // The rogue's claim of 100 free slots stays in the books until its heartbeats are missed
    // (4 minutes here): meanwhile the master deals every task to the real worker at once, which
    // defers what it has no room for, and may fall far enough behind to be cut off too (it
    // reconnects).
    assert!(count(&s, "guard_stalled") >= 1, "{s}");
    assert_eq!(by_worker(&s, "w1"), 24, "{s}");
    assert_outputs(&output, &expected);
    assert!(w.wait().success(), "worker did not obey stop");
    drop((tasks, results));
}

/// A connection to `endpoint` with a 4 KiB receive buffer (set before connecting, so that the
/// window it offers stays small).
fn socket2_free_pull(endpoint: &str) -> TcpStream {
    let addr: std::net::SocketAddr = endpoint.trim_start_matches("tcp://").parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let std = stream.into_std().unwrap();
        std.set_nonblocking(false).unwrap();
        std
    })
}
