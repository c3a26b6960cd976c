//! Liveness process tests: workers that hang, stall or lose their master, on the real binaries.
#![allow(clippy::unwrap_used)]

mod support;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::*;

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

/// Issue 6, item 7: a task of an interrupted master's batch, still running when a new master
/// on the same output directory finishes, must not rename its output over the new batch's.
#[test]
fn a_task_of_an_old_batch_never_overwrites_the_new_batch() {
    const IMAGES: usize = 6;
    let dir = Scratch::new("old-batch");
    let (input, output) = (dir.path("in"), dir.path("out"));
    std::fs::create_dir_all(&input).unwrap();
    let names: Vec<String> = (0..IMAGES).map(|i| format!("c{i}.png")).collect();
    for name in &names {
        image::RgbImage::from_pixel(24, 16, image::Rgb([220, 40, 10]))
            .save(input.join(name))
            .unwrap();
    }
    let eps = free_endpoints(3);
    let (mut first, _) = master_on(&eps, &input, &output, &["--filter", "invert"]);
    // One image at a time, 4 s each: when the first output appears the second task is running.
    let mut slow = worker(
        &eps.join(","),
        "slow",
        &["--delay-ms", "4000", "--prefetch", "1", "--drain-s", "60"],
    );
    wait_until("the slow worker's first output", || {
        !files_under(&output).is_empty()
    });
    first.kill();
    let (mut second, _) = master_on(&eps, &input, &output, &["--filter", "grayscale"]);
    let _fast = worker(&eps.join(","), "fast", &[]);
    assert!(second.wait().success(), "{}", second.stderr());
    let s = second.summary();
    assert_eq!(count(&s, "done"), IMAGES as u64, "{s}");
    // Let the old task finish: SIGTERM drains running images (up to --drain-s) before exiting.
    signal(&slow, Signal::SIGTERM);
    assert!(slow.wait().success(), "{}", slow.stderr());
    assert_outputs(&output, &names);
    for name in &names {
        let img = image::open(output.join(name)).unwrap().to_rgb8();
        assert!(
            img.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]),
            "{name} was overwritten by the old batch (inverted, not gray)"
        );
    }
}

/// Issue 6, item 8: after a master restart the worker reconnects once; its timer for the
/// master's heartbeats starts afresh, so it does not tear its links down again, and it never
/// holds two task connections (the master would deal to the newer one of its name anyway).
#[test]
fn a_worker_holds_one_task_connection_after_a_master_restart() {
    let dir = Scratch::new("restart-links");
    let input = dir.path("in");
    samples(&input, 20, 24);
    let eps = free_endpoints(3);
    let (mut first, _) = master_on(&eps, &input, &dir.path("out1"), &["--filter", "invert"]);
    let mut w = worker(
        &eps.join(","),
        "w1",
        &["--delay-ms", "50", "--reconnect-max-ms", "200"],
    );
    assert!(first.wait().success(), "{}", first.stderr());
    // The outage must outlast the worker's liveness window (4 x 250 ms).
    std::thread::sleep(std::time::Duration::from_secs(2));
    let out2 = dir.path("out2");
    let (mut second, _) = master_on(
        &eps,
        &input,
        &out2,
        &["--filter", "invert", "--stop-workers"],
    );
    let port = port_of(&eps[0]);
    let (mut most, mut seen) = (0, std::collections::BTreeSet::new());
    // What changed and when, for the failure message: (ms since the master was ready, inodes).
    let (start, mut timeline) = (std::time::Instant::now(), Vec::new());
    wait_until("the second batch", || {
        let now = connections_to(w.pid(), port);
        if timeline.last().map(|(_, n)| n) != Some(&now) {
            timeline.push((start.elapsed().as_millis(), now.clone()));
        }
        most = most.max(now.len());
        seen.extend(now);
        second.exited()
    });
    assert!(second.wait().success(), "{}", second.stderr());
    assert_eq!(count(&second.summary(), "done"), 20);
    assert_eq!(
        most, 1,
        "the worker held {most} task connections at once: {timeline:?}"
    );
    assert_eq!(
        seen.len(),
        1,
        "the worker tore down its task link to the new master needlessly: {timeline:?}"
    );
    assert!(w.wait().success(), "{}", w.stderr());
}

/// Issue 6, item 10: `--stop-workers` reaches workers the master never heard of, even when the
/// batch is empty and it knows none.
#[test]
fn stop_reaches_workers_of_an_empty_batch() {
    let dir = Scratch::new("empty-stop");
    let input = dir.path("in");
    std::fs::create_dir_all(&input).unwrap();
    let eps = free_endpoints(3);
    // The worker first, so that it is there whenever the master is.
    let mut w = worker(&eps.join(","), "w1", &["--reconnect-max-ms", "100"]);
    w.ready();
    let (mut m, _) = master_on(
        &eps,
        &input,
        &dir.path("out"),
        &["--stop-workers", "--liveness", "40"],
    );
    assert!(m.wait().success(), "{}", m.stderr());
    assert_eq!(count(&m.summary(), "total"), 0);
    assert!(
        w.wait().success(),
        "the worker did not obey stop: {}",
        w.stderr()
    );
}

/// Issue 7: `--task-timeout-s` sends again a task a live worker accepted and never answers.
#[test]
fn task_timeout_resends_a_stuck_task() {
    const IMAGES: usize = 8;
    let dir = Scratch::new("task-timeout");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, IMAGES, 24);
    let (mut m, connect) = master(
        &input,
        &output,
        &[
            "--filter",
            "invert",
            "--stop-workers",
            "--min-workers",
            "2",
            "--task-timeout-s",
            "1",
        ],
    );
    // Alive (it heartbeats) but stuck on every image it takes.
    let _stuck = worker(&connect, "stuck", &["--delay-ms", "600000"]);
    let _ok = worker(&connect, "ok", &[]);
    assert!(m.wait().success(), "{}", m.stderr());
    let s = m.summary();
    assert_eq!(
        (count(&s, "done"), by_worker(&s, "ok")),
        (IMAGES as u64, IMAGES as u64),
        "{s}"
    );
    assert!(count(&s, "resent") >= 1, "{s}");
    assert_outputs(&output, &expected);
}

/// Issue 7: a worker whose links to the master go silent without any socket event (a partition)
/// notices that the master's heartbeats stopped and connects again. The master's own window is
/// ten times longer (40 x 250 ms), so it never gives the worker up: the batch finishes only if
/// the master also stops dealing into the worker's old task connection (the new one, named
/// like it, replaces it) and re-sends what the worker had accepted when it says hello again
/// (the done reports sent on the old link are lost).
#[test]
fn a_worker_reconnects_when_the_master_heartbeats_stop() {
    const IMAGES: usize = 30;
    let dir = Scratch::new("silent-master");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, IMAGES, 24);
    let (mut m, connect) = master(
        &input,
        &output,
        &["--filter", "invert", "--stop-workers", "--liveness", "40"],
    );
    let relays: Vec<Relay> = connect.split(',').map(Relay::start).collect();
    let via: Vec<&str> = relays.iter().map(|r| r.endpoint.as_str()).collect();
    let mut w = worker(&via.join(","), "w1", &["--delay-ms", "50"]);
    wait_until("some outputs", || files_under(&output).len() >= 3);
    for r in &relays {
        r.blackhole();
    }
    // Only a worker that connects again (through the relays, to fresh connections) finishes.
    assert!(m.wait().success(), "{}", m.stderr());
    let s = m.summary();
    assert_eq!(count(&s, "done"), IMAGES as u64, "{s}");
    assert_outputs(&output, &expected);
    assert!(w.wait().success(), "{}", w.stderr());
}
