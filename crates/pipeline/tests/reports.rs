//! Issue 19, "Reports taken on trust" (cases 6, 7 and 8), on the real `pipeline` master and
//! `pipeline-worker` binaries, with rogue peers on raw zmq.rs sockets (`rogue`): what a worker
//! claims is checked against the master's books.
#![allow(clippy::unwrap_used)]

mod rogue;
mod support;

use std::time::Duration;

use rogue::{Answer, Rogue};
use support::*;

/// The `batch=` of a master's ready line.
fn batch_of(m: &Proc) -> String {
    m.stdout
        .iter()
        .find_map(|l| common::ready::parse(l))
        .and_then(|f| f.get("batch").cloned())
        .expect("ready line with batch=")
}

/// Case 6: a worker that accepts every task and finishes none, announcing `free=2` (or
/// 100,000) on every report, held 188 (and 200) of 200 tasks within a second, and the batch
/// waited for the task timeout (120 s by default). It may hold no more than the two slots it
/// announced at hello, and the batch finishes within 1.5x the healthy worker's time alone.
#[test]
fn a_hoarding_worker_holds_no_more_than_its_slots_and_costs_the_batch_little() {
    const IMAGES: usize = 60;
    let dir = Scratch::new("hoard");
    let input = dir.path("in");
    let expected = samples(&input, IMAGES, 24);
    // 100 ms of simulated work per image: sleeps, so the timing holds on a busy machine.
    let healthy = ["--delay-ms", "100"];

    let alone_out = dir.path("alone");
    let (mut m, connect) = master(
        &input,
        &alone_out,
        &["--filter", "invert", "--stop-workers"],
    );
    let _w = worker(&connect, "healthy", &healthy);
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let alone = m.summary();
    assert_eq!(count(&alone, "done"), IMAGES as u64, "{alone}");
    let alone_ms = count(&alone, "elapsed_ms");

    for free in [2, 100_000] {
        let output = dir.path(&format!("out-{free}"));
        let (mut m, connect) = master(
            &input,
            &output,
            &["--filter", "invert", "--stop-workers", "--min-workers", "2"],
        );
        let hoarder = Rogue {
            id: "hoarder".into(),
            slots: 2,
            free,
            takes_tasks: true,
            answer: Answer::Hoard,
            ghost_done: None,
        }
        .start(&connect);
        let _w = worker(&connect, "healthy", &healthy);
        assert!(m.wait().success(), "master failed: {}", m.stderr());
        let s = m.summary();
        let took_ms = count(&s, "elapsed_ms");
        eprintln!(
            "free={free}: healthy alone {alone_ms} ms, beside the hoarder {took_ms} ms; the \
             hoarder was dealt {} task messages, {} distinct; summary {s}",
            hoarder.seen().tasks,
            hoarder.seen().ids.len()
        );
        assert_eq!(
            (count(&s, "done"), count(&s, "failed")),
            (IMAGES as u64, 0),
            "{s}"
        );
        assert_eq!(by_worker(&s, "healthy"), IMAGES as u64, "{s}");
        // What the hoarder held when the batch ran out of work got a backup copy each: no
        // more than its two slots.
        assert!(count(&s, "backups") <= 2, "{s}");
        // Dealt by credit (issue 19, case 3), it is sent no more than its two slots: nothing
        // to refuse. (On round robin it was dealt more, each refused.)
        assert!(
            hoarder.seen().ids.len() <= 2,
            "dealt {} distinct tasks, beyond its two slots: {s}",
            hoarder.seen().ids.len()
        );
        assert!(
            took_ms <= alone_ms * 3 / 2,
            "the hoarder stalled the batch: {took_ms} ms against {alone_ms} ms alone: {s}"
        );
        assert_outputs(&output, &expected);
    }
}

/// Peak resident memory of process `pid`, in MiB (`VmHWM`).
fn peak_rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Case 7: inline mode, 24 files of 30 MiB, one peer claiming `free=1000` (and 1000 slots) that
/// does not read its tasks: the master read and queued them all for it, 789 MiB of peak RSS
/// where the docs promise about two images per slot. Now the image bytes it holds stay under
/// `--max-inline-bytes` (2 x `--max-image-bytes`, 64 MiB by default), which the library's write
/// buffers about double.
#[test]
fn inline_memory_stays_bounded_whatever_free_a_peer_claims() {
    const FILES: usize = 24;
    const SIZE: u64 = 30 << 20;
    let dir = Scratch::new("inline-memory");
    let (input, output) = (dir.path("in"), dir.path("out"));
    std::fs::create_dir_all(&input).unwrap();
    for i in 0..FILES {
        // Sparse: read as 30 MiB of zeros, costing no disk. The master does not decode.
        let f = std::fs::File::create(input.join(format!("f{i:02}.png"))).unwrap();
        f.set_len(SIZE).unwrap();
    }
    let (mut m, connect) = master(&input, &output, &["--transfer", "inline"]);
    let _peer = Rogue {
        id: "greedy".into(),
        slots: 1000,
        free: 1000,
        takes_tasks: true,
        answer: Answer::Unread,
        ghost_done: None,
    }
    .start(&connect);
    // Three liveness windows of the test timing (4 x 250 ms): the master has long given up on
    // the tasks it sent (a probe, unaccepted, taken back within a second).
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let mut peak = 0;
    while std::time::Instant::now() < until {
        assert!(!m.exited(), "the master exited: {}", m.stderr());
        if let Some(p) = peak_rss_mib(m.pid()) {
            peak = peak.max(p);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("master peak RSS {peak} MiB");
    // 64 MiB of image bytes held at most, the library's copies of those being written, and the
    // process itself.
    assert!(
        peak <= 200,
        "master peak RSS {peak} MiB for 30 MiB images: not bounded"
    );
}

/// Case 8, a ghost: a peer that read the batch id (here from the ready line, as from any
/// heartbeat) and reported `done` for ids 0-49 without ever holding a task got exit 0, `done:
/// 50` and no file on disk. Its reports now change nothing: the batch waits for a real worker,
/// which does every image.
#[test]
fn a_ghost_reporting_done_for_tasks_it_never_held_changes_nothing() {
    const IMAGES: usize = 50;
    let dir = Scratch::new("ghost");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, IMAGES, 16);
    let (mut m, connect) = master(&input, &output, &["--filter", "invert", "--stop-workers"]);
    let batch = batch_of(&m);
    let ghost = Rogue {
        id: "ghost".into(),
        slots: 1000,
        free: 1000,
        takes_tasks: false,
        answer: Answer::Hoard,
        ghost_done: Some((batch, 0..IMAGES as u64)),
    }
    .start(&connect);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !m.exited(),
        "the ghost's reports ended the batch: {:?}",
        m.stdout
    );
    assert!(files_under(&output).is_empty());
    let _w = worker(&connect, "real", &[]);
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    drop(ghost);
    let s = m.summary();
    assert_eq!(
        (count(&s, "done"), count(&s, "failed")),
        (IMAGES as u64, 0),
        "{s}"
    );
    assert_eq!(by_worker(&s, "real"), IMAGES as u64, "{s}");
    assert_eq!(by_worker(&s, "ghost"), 0, "{s}");
    assert_eq!(count(&s, "stray"), IMAGES as u64, "{s}");
    eprintln!("{s}");
    assert_outputs(&output, &expected);
}

/// Case 8, a liar: a peer that takes tasks (it holds them) and reports them done without
/// writing anything. In path mode a `done` counts only with its output on disk: the liar's do
/// not, it is distrusted after the first, and the real worker does every image.
#[test]
fn a_done_without_its_output_on_disk_does_not_count() {
    const IMAGES: usize = 20;
    let dir = Scratch::new("liar");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, IMAGES, 16);
    let (mut m, connect) = master(
        &input,
        &output,
        &["--filter", "invert", "--stop-workers", "--min-workers", "2"],
    );
    let liar = Rogue {
        id: "liar".into(),
        slots: 2,
        free: 2,
        takes_tasks: true,
        answer: Answer::DoneWithoutOutput,
        ghost_done: None,
    }
    .start(&connect);
    let _w = worker(&connect, "real", &["--delay-ms", "20"]);
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let s = m.summary();
    eprintln!(
        "the liar was dealt {} tasks; summary {s}",
        liar.seen().tasks
    );
    assert!(liar.seen().tasks >= 1, "the liar got no task: {s}");
    assert_eq!(
        (count(&s, "done"), count(&s, "failed")),
        (IMAGES as u64, 0),
        "{s}"
    );
    assert_eq!(by_worker(&s, "real"), IMAGES as u64, "{s}");
    assert_eq!(s["distrusted"], serde_json::json!(["liar"]), "{s}");
    assert_outputs(&output, &expected);
}
