//! Liveness process tests: workers that hang, stall or lose their master, on the real binaries.
#![allow(clippy::unwrap_used)]

mod support;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::*;

fn count(summary: &serde_json::Value, field: &str) -> u64 {
    summary[field]
        .as_u64()
        .unwrap_or_else(|| panic!("summary has no {field}: {summary}"))
}

fn by_worker(summary: &serde_json::Value, id: &str) -> u64 {
    summary["by_worker"][id].as_u64().unwrap_or(0)
}

fn signal(p: &Proc, sig: Signal) {
    kill(Pid::from_raw(p.pid() as i32), sig).unwrap();
}

/// Issue 6, item 5: a worker that is connected but hung (SIGSTOP) while holding tasks. The
/// master must stop dealing to it and re-send its tasks within the liveness window: the batch
/// takes at most 1.5x the healthy worker's time alone plus that window, every image done once.
#[test]
fn hung_worker_does_not_stall_the_batch() {
    const IMAGES: usize = 60;
    let dir = Scratch::new("hung");
    let input = dir.path("in");
    let expected = samples(&input, IMAGES, 24);
    // 100 ms of simulated work per image: sleeps, so the timing holds on a busy machine.
    let healthy = ["--delay-ms", "100", "--threads", "1"];

    let alone_out = dir.path("alone");
    let (mut m, connect) = master(
        &input,
        &alone_out,
        &["--filter", "invert", "--stop-workers"],
    );
    let _a = worker(&connect, "healthy", &healthy);
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let alone = m.summary();
    assert_eq!(count(&alone, "done"), IMAGES as u64, "{alone}");
    let alone_ms = count(&alone, "elapsed_ms");

    let output = dir.path("out");
    let (mut m, connect) = master(
        &input,
        &output,
        &["--filter", "invert", "--stop-workers", "--min-workers", "2"],
    );
    // The hung worker takes tasks and never finishes them, then stops answering at all.
    let mut hung = worker(&connect, "hung", &["--delay-ms", "600000"]);
    let _a = worker(&connect, "healthy", &healthy);
    wait_until("the first outputs", || !files_under(&output).is_empty());
    signal(&hung, Signal::SIGSTOP);
    let status = m.wait();
    signal(&hung, Signal::SIGCONT);
    hung.kill();
    assert!(status.success(), "master failed: {}", m.stderr());
    let s = m.summary();
    assert_eq!(
        (count(&s, "done"), count(&s, "failed")),
        (IMAGES as u64, 0),
        "{s}"
    );
    assert_eq!(by_worker(&s, "healthy"), IMAGES as u64, "{s}");
    assert_outputs(&output, &expected);
    // Liveness window of the test workers: 4 x 250 ms.
    let window_ms = 1000;
    let hung_ms = count(&s, "elapsed_ms");
    eprintln!("healthy alone {alone_ms} ms, with a hung second worker {hung_ms} ms");
    assert!(
        hung_ms <= alone_ms * 3 / 2 + window_ms,
        "a hung worker stalled the batch: {hung_ms} ms against {alone_ms} ms alone: {s}"
    );
}
