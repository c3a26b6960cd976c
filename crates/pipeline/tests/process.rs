//! Process tests: the real `pipeline` master and `pipeline-worker` binaries on loopback.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;

use support::*;

#[test]
fn one_worker_filters_every_image_and_stops() {
    let dir = Scratch::new("one");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 10, 48);
    let (mut m, connect) = master(
        &input,
        &output,
        &["--filter", "grayscale", "--stop-workers"],
    );
    let mut w = worker(&connect, "w1", &[]);
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let s = m.summary();
    assert_eq!(
        (count(&s, "total"), count(&s, "done"), count(&s, "failed")),
        (10, 10, 0)
    );
    assert_eq!(by_worker(&s, "w1"), 10);
    assert_outputs(&output, &expected);
    for rel in &expected {
        let img = image::open(output.join(rel)).unwrap().to_rgb8();
        let px = img.get_pixel(img.width() / 2, img.height() / 2);
        // JPEG may round a little; the channels of a gray pixel stay together.
        let spread = px.0.iter().max().unwrap() - px.0.iter().min().unwrap();
        assert!(spread <= 3, "{rel} is not gray: {px:?}");
    }
    assert!(w.wait().success(), "worker did not obey stop");
}

#[test]
fn several_workers_share_the_batch_and_all_stop() {
    let dir = Scratch::new("several");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 30, 40);
    let (mut m, connect) = master(
        &input,
        &output,
        &["--filter", "invert", "--stop-workers", "--min-workers", "3"],
    );
    let mut workers: Vec<Proc> = (0..3)
        .map(|i| worker(&connect, &format!("w{i}"), &["--delay-ms", "30"]))
        .collect();
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let s = m.summary();
    assert_eq!(count(&s, "done"), 30);
    let counts: Vec<u64> = (0..3).map(|i| by_worker(&s, &format!("w{i}"))).collect();
    assert_eq!(counts.iter().sum::<u64>(), 30);
    assert!(
        counts.iter().all(|c| *c > 0),
        "a worker got nothing: {counts:?}"
    );
    assert_outputs(&output, &expected);
    for w in &mut workers {
        assert!(w.wait().success(), "worker did not obey stop");
    }
}

#[test]
fn faster_worker_does_more() {
    let dir = Scratch::new("speeds");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 30, 32);
    let (mut m, connect) = master(
        &input,
        &output,
        &[
            "--filter",
            "grayscale",
            "--stop-workers",
            "--min-workers",
            "2",
        ],
    );
    let _fast = worker(&connect, "fast", &["--delay-ms", "10"]);
    let _slow = worker(&connect, "slow", &["--delay-ms", "300"]);
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let s = m.summary();
    assert_eq!(count(&s, "done"), 30);
    let (fast, slow) = (by_worker(&s, "fast"), by_worker(&s, "slow"));
    assert!(slow > 0, "the slow worker got nothing: {s}");
    assert!(
        fast > 2 * slow,
        "round robin ignored speed: fast {fast}, slow {slow}"
    );
    assert_outputs(&output, &expected);
}

#[test]
fn late_worker_joins_and_gets_work() {
    let dir = Scratch::new("late");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 20, 32);
    let (mut m, connect) = master(
        &input,
        &output,
        &["--filter", "grayscale", "--stop-workers"],
    );
    // Alone, the early worker would need 20 s: the late one surely arrives with work left.
    let _early = worker(&connect, "early", &["--delay-ms", "1000"]);
    wait_until("the early worker's first output", || {
        !files_under(&output).is_empty()
    });
    let _late = worker(&connect, "late", &[]);
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let s = m.summary();
    assert_eq!(count(&s, "done"), 20);
    assert!(
        by_worker(&s, "late") > by_worker(&s, "early"),
        "the late worker got little or nothing: {s}"
    );
    assert_outputs(&output, &expected);
}

#[test]
fn worker_killed_mid_batch_loses_no_image() {
    let dir = Scratch::new("kill");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 40, 32);
    let (mut m, connect) = master(
        &input,
        &output,
        &[
            "--filter",
            "grayscale,blur:1.0",
            "--stop-workers",
            "--min-workers",
            "2",
        ],
    );
    // The victim takes tasks and finishes none: once the batch is under way it holds some.
    let mut victim = worker(&connect, "victim", &["--delay-ms", "600000"]);
    let _survivor = worker(&connect, "survivor", &["--delay-ms", "100"]);
    wait_until("some outputs", || files_under(&output).len() >= 2);
    victim.kill(); // SIGKILL: no bye, tasks held by it are only noticed by heartbeat silence
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let s = m.summary();
    assert_eq!((count(&s, "done"), count(&s, "failed")), (40, 0), "{s}");
    assert!(
        count(&s, "resent") >= 1,
        "the victim's tasks were not re-sent: {s}"
    );
    assert_eq!(by_worker(&s, "survivor"), 40, "{s}");
    assert_outputs(&output, &expected);
}

#[test]
fn corrupt_and_non_image_files_are_reported_and_the_batch_goes_on() {
    let dir = Scratch::new("corrupt");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let good = samples(&input, 6, 32);
    std::fs::write(
        input.join("corrupt.png"),
        b"\x89PNG\r\n\x1a\nthis is not a png",
    )
    .unwrap();
    let jpeg =
        std::fs::read(input.join(good.iter().find(|p| p.ends_with(".jpg")).unwrap())).unwrap();
    std::fs::write(input.join("truncated.jpg"), &jpeg[..20]).unwrap();
    std::fs::write(input.join("notes.txt"), b"hello").unwrap();
    let (mut m, connect) = master(&input, &output, &["--filter", "edges", "--stop-workers"]);
    let _w = worker(&connect, "w1", &[]);
    let status = m.wait();
    assert_eq!(status.code(), Some(3), "a batch with failures must exit 3");
    let s = m.summary();
    assert_eq!(
        (count(&s, "total"), count(&s, "done"), count(&s, "failed")),
        (9, 6, 3),
        "{s}"
    );
    let mut failed: Vec<String> = s["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert!(!f["reason"].as_str().unwrap().is_empty(), "no reason: {f}");
            f["path"].as_str().unwrap().to_string()
        })
        .collect();
    failed.sort();
    assert_eq!(failed, ["corrupt.png", "notes.txt", "truncated.jpg"]);
    assert_outputs(&output, &good);
}

#[test]
fn setup_errors_are_one_line_and_leave_nothing() {
    let dir = Scratch::new("errors");
    let input = dir.path("in");
    samples(&input, 1, 16);
    let file = dir.path("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = dir.path("out");
    let missing = dir.path("missing");
    let under_file = file.join("sub");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_ep = format!("tcp://{}", busy.local_addr().unwrap());
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "--input",
                missing.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ],
            "input directory",
        ),
        (
            &[
                "--input",
                input.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--filter",
                "sepia",
            ],
            "unknown filter",
        ),
        (
            &[
                "--input",
                input.to_str().unwrap(),
                "--output",
                under_file.to_str().unwrap(),
            ],
            "not writable",
        ),
        (
            &[
                "--input",
                input.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--tasks-bind",
                &busy_ep,
            ],
            "cannot bind",
        ),
    ];
    for (args, needle) in cases {
        let tasks_bind: &[&str] = if args.contains(&"--tasks-bind") {
            &[]
        } else {
            &["--tasks-bind", "tcp://127.0.0.1:0"]
        };
        let o = Command::new(master_bin())
            .args(args)
            .args(tasks_bind)
            .args([
                "--results-bind",
                "tcp://127.0.0.1:0",
                "--control-bind",
                "tcp://127.0.0.1:0",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
        assert!(errors[0].contains(needle), "{args:?}: {stderr}");
        assert!(o.stdout.is_empty(), "{args:?} printed on stdout");
        assert!(!out.exists(), "{args:?} created the output directory");
    }
}

#[test]
fn worker_serves_the_next_batch_of_a_restarted_master() {
    let dir = Scratch::new("next");
    let input = dir.path("in");
    let expected = samples(&input, 8, 32);
    let eps = free_endpoints(3);
    let run = |out: &str, extra: &[&str]| {
        let mut args = vec!["--filter", "invert"];
        args.extend_from_slice(extra);
        master_on(&eps, &input, &dir.path(out), &args).0
    };
    let mut first = run("out1", &[]);
    let mut w = worker(&eps.join(","), "w1", &["--reconnect-max-ms", "200"]);
    assert!(first.wait().success(), "{}", first.stderr());
    assert_eq!(count(&first.summary(), "done"), 8);
    let mut second = run("out2", &["--stop-workers"]);
    assert!(second.wait().success(), "{}", second.stderr());
    let s = second.summary();
    assert_eq!((count(&s, "done"), by_worker(&s, "w1")), (8, 8), "{s}");
    assert_outputs(&dir.path("out1"), &expected);
    assert_outputs(&dir.path("out2"), &expected);
    assert!(
        w.wait().success(),
        "worker did not obey the second master's stop"
    );
}

#[test]
fn inline_transfer_carries_bytes_and_the_master_writes() {
    let dir = Scratch::new("inline");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let mut expected = samples(&input, 8, 32);
    std::fs::write(input.join("big.png"), vec![0u8; 20_000]).unwrap();
    let (mut m, connect) = master(
        &input,
        &output,
        &[
            "--transfer",
            "inline",
            "--max-image-bytes",
            "16000",
            "--filter",
            "thumbnail:16",
            "--stop-workers",
        ],
    );
    let _w = worker(&connect, "w1", &[]);
    assert_eq!(m.wait().code(), Some(3));
    let s = m.summary();
    assert_eq!((count(&s, "done"), count(&s, "failed")), (8, 1), "{s}");
    assert_eq!(s["failures"][0]["path"], "big.png");
    expected.retain(|p| p != "big.png");
    assert_outputs(&output, &expected);
    for rel in &expected {
        let img = image::open(output.join(rel)).unwrap();
        assert!(img.width() <= 16 && img.height() <= 16, "{rel} not resized");
    }
}

#[test]
fn sample_set_with_local_workers_needs_no_flags() {
    let dir = Scratch::new("sample");
    let output = dir.path("out");
    let mut m = Proc::spawn(
        master_bin(),
        &[
            "--output",
            output.to_str().unwrap(),
            "--local-workers",
            "2",
            "--json",
            "--tasks-bind",
            "tcp://127.0.0.1:0",
            "--results-bind",
            "tcp://127.0.0.1:0",
            "--control-bind",
            "tcp://127.0.0.1:0",
        ],
    );
    assert_eq!(m.ready()["total"], "36");
    assert!(m.wait().success(), "{}", m.stderr());
    let s = m.summary();
    assert_eq!((count(&s, "done"), count(&s, "failed")), (36, 0), "{s}");
    assert_eq!(files_under(&output).len(), 36);
}

#[test]
fn signals_stop_master_and_worker_with_status_zero() {
    let dir = Scratch::new("signals");
    let (input, output) = (dir.path("in"), dir.path("out"));
    samples(&input, 4, 16);
    let (mut m, connect) = master(&input, &output, &[]);
    let mut w = Proc::spawn(
        worker_bin(),
        &["--connect", "tcp://127.0.0.1:9,tcp://127.0.0.1:9"],
    );
    // No worker for this master and no master for this worker: both wait until signalled.
    assert!(w.ready().contains_key("worker"));
    m.signal("INT");
    w.signal("TERM");
    assert!(m.wait().success(), "{}", m.stderr());
    assert_eq!(m.summary()["interrupted"], true);
    assert!(w.wait().success(), "{}", w.stderr());
    drop(connect);
}

#[test]
fn worker_terminated_mid_batch_exits_zero_and_hands_back_its_tasks() {
    let dir = Scratch::new("term");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 30, 32);
    let (mut m, connect) = master(
        &input,
        &output,
        &["--filter", "invert", "--stop-workers", "--min-workers", "2"],
    );
    let mut leaving = worker(&connect, "leaving", &["--delay-ms", "100"]);
    let mut staying = worker(&connect, "staying", &["--delay-ms", "100"]);
    leaving.ready();
    staying.ready();
    wait_until("some outputs", || files_under(&output).len() >= 4);
    leaving.signal("TERM");
    assert!(
        leaving.wait().success(),
        "SIGTERM must exit 0: {}",
        leaving.stderr()
    );
    assert!(m.wait().success(), "master failed: {}", m.stderr());
    let s = m.summary();
    assert_eq!((count(&s, "done"), count(&s, "failed")), (30, 0), "{s}");
    assert!(by_worker(&s, "staying") > 0, "{s}");
    assert_outputs(&output, &expected);
    assert!(staying.wait().success());
}

#[test]
fn images_beyond_the_decoder_limit_fail_with_a_reason() {
    let dir = Scratch::new("limit");
    let (input, output) = (dir.path("in"), dir.path("out"));
    std::fs::create_dir_all(&input).unwrap();
    image::RgbImage::new(1200, 1200)
        .save(input.join("big.png"))
        .unwrap();
    image::RgbImage::new(20, 20)
        .save(input.join("small.png"))
        .unwrap();
    let (mut m, connect) = master(&input, &output, &["--filter", "invert", "--stop-workers"]);
    let _w = worker(&connect, "w1", &["--max-decode-mib", "1"]);
    assert_eq!(m.wait().code(), Some(3));
    let s = m.summary();
    assert_eq!((count(&s, "done"), count(&s, "failed")), (1, 1), "{s}");
    assert_eq!(s["failures"][0]["path"], "big.png");
    assert!(
        s["failures"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("limit"),
        "{s}"
    );
    assert_outputs(&output, &["small.png".to_string()]);
}
