//! The master's three sockets are our own ZMTP code (`common::wire`: PUSH, PULL, PUB on the
//! wire), with their limits on every endpoint, loopback included, whatever the flags (issue 19,
//! case 1), and they deal tasks by credit, per connection (cases 2 and 3).
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::Instant;

use common::zmtp::{self, greeting, huge_header as nine_bytes, send_raw};

use support::*;

/// Case 1: nine bytes claiming a 1 TiB frame, with and without a greeting, on each loopback
/// port of a master with its default flags: each connection is refused, the master serves on and
/// finishes its batch. (On zmq.rs's sockets, with `--guard auto` leaving loopback unguarded,
/// the master aborted, exit 134, on whichever socket got them.)
#[test]
fn nine_bytes_on_each_loopback_port_do_not_kill_a_master_with_default_flags() {
    let dir = Scratch::new("nine-bytes");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 8, 32);
    let (mut m, connect) = master(&input, &output, &["--filter", "invert", "--stop-workers"]);
    let endpoints: Vec<&str> = connect.split(',').collect();
    assert_eq!(endpoints.len(), 3, "{connect}");
    for endpoint in &endpoints {
        assert!(send_raw(endpoint, &nine_bytes()), "cannot reach {endpoint}");
        assert!(send_raw(endpoint, &[greeting(), nine_bytes()].concat()));
        assert!(!m.exited(), "the master died of nine bytes on {endpoint}");
    }
    let mut w = worker(&connect, "w1", &[]);
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let s = m.summary();
    assert_eq!((count(&s, "done"), count(&s, "failed")), (8, 0), "{s}");
    assert_eq!(count(&s, "guard_refused"), 6, "every attack refused: {s}");
    assert_outputs(&output, &expected);
    assert!(w.wait().success(), "worker did not obey stop");
}

/// Every attack of `common::zmtp::attacks` (nine bytes with and without a greeting, a frame over
/// a 64 KiB limit, 5,000 empty frames with MORE) on each of the three sockets: 12 of 12
/// refused, and a real inline batch (image bytes both ways) completes afterwards.
#[test]
fn every_master_socket_refuses_bad_peers_and_the_inline_batch_completes() {
    let dir = Scratch::new("limits");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 8, 48);
    let (mut m, connect) = master(
        &input,
        &output,
        &[
            "--filter",
            "invert",
            "--stop-workers",
            "--transfer",
            "inline",
            "--max-message-bytes",
            "65536",
            "--max-image-bytes",
            "60000",
        ],
    );
    for endpoint in connect.split(',') {
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
    assert_eq!(count(&s, "guard_refused"), 12, "every attack refused: {s}");
    assert_eq!(count(&s, "guard_stalled"), 0, "{s}");
    assert_outputs(&output, &expected);
    assert!(w.wait().success(), "worker did not obey stop");
}

/// The handshake of a raw peer of `socket_type`.
fn handshake(socket_type: &str) -> Vec<u8> {
    [greeting(), zmtp::ready(socket_type)].concat()
}

/// Cases 2 and 3: a fake worker says hello with 100 free slots and connects a task PULL (no
/// identity) that never reads, beside a real worker. The fake gets one probe task at most,
/// taken back within a second when it is not accepted: the batch takes about as long as the
/// real worker alone (on round robin the fake was dealt every other task, and each waited for
/// the liveness window or a cut of every task link).
#[test]
fn a_peer_that_claims_room_and_never_reads_its_tasks_costs_one_probe_at_most() {
    let dir = Scratch::new("stray-pull");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 40, 64);
    let delay = ["--delay-ms", "20"];

    let alone_out = dir.path("alone");
    let (mut m, connect) = master(
        &input,
        &alone_out,
        &["--filter", "invert", "--stop-workers"],
    );
    let _w = worker(&connect, "w1", &delay);
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let alone_ms = count(&m.summary(), "elapsed_ms");

    let (mut m, connect) = master(
        &input,
        &output,
        &["--filter", "invert", "--stop-workers", "--min-workers", "2"],
    );
    let endpoints: Vec<&str> = connect.split(',').collect();
    let mut tasks = TcpStream::connect(endpoints[0].trim_start_matches("tcp://")).unwrap();
    tasks.write_all(&handshake("PULL")).unwrap();
    let hello = br#"{"type":"hello","worker":"rogue","slots":100,"free":100,"heartbeat_ms":60000}"#;
    let mut results = TcpStream::connect(endpoints[1].trim_start_matches("tcp://")).unwrap();
    results
        .write_all(&[handshake("PUSH"), zmtp::frame(0, hello)].concat())
        .unwrap();
    let started = Instant::now();
    let mut w = worker(&connect, "w1", &delay);
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let took = started.elapsed();
    let s = m.summary();
    assert_eq!((count(&s, "done"), count(&s, "failed")), (40, 0), "{s}");
    assert_eq!(by_worker(&s, "w1"), 40, "{s}");
    let took_ms = count(&s, "elapsed_ms");
    eprintln!("alone {alone_ms} ms, beside the stray {took_ms} ms (wall {took:?}): {s}");
    assert!(
        took_ms <= alone_ms + 1000,
        "the stray cost more than a second: {took_ms} ms against {alone_ms} ms alone: {s}"
    );
    assert!(
        count(&s, "resent") <= 1,
        "one probe taken back at most: {s}"
    );
    assert_outputs(&output, &expected);
    assert!(w.wait().success(), "worker did not obey stop");
    drop((tasks, results));
}
