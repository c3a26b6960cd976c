//! Issue 19, "Inputs and outputs" (cases 9 to 12), on the real `pipeline` master and
//! `pipeline-worker` binaries: a poison image, two batches sharing an output tree, names that
//! are not text and linked folders, and a slow disk under the master. Slow disks are made with
//! `strace` fault injection (`inject=fsync:delay_enter=`, root not needed); without strace those
//! tests show as ignored (see `build.rs`), and under CI they fail if it is missing.
#![allow(clippy::unwrap_used)]

mod support;

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use support::*;

/// Waits for `p` to exit within `within`; `None` if it did not (it is killed on drop).
fn exit_within(p: &mut Proc, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if p.exited() {
            return Some(p.wait());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn reasons(s: &serde_json::Value) -> Vec<(String, String)> {
    s["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap_or("?").to_string(),
                f["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Peak resident memory of process `pid`, in MiB (`VmHWM`).
fn peak_rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Case 9: an "image" that blocks its reader (a link to a named pipe, standing in for a file on
/// a hung network mount), `--task-timeout-s 3`, two workers: the master re-sent it every 3 s
/// for ever and never exited. Now it fails at once with its reason (not a regular file), the
/// good images are done and the batch exits 3. Beside it, a sparse file of 1.5 GiB, which a
/// worker read whole (peak RSS 1.5 GiB): refused before reading, over the worker's limit.
#[test]
fn a_pipe_and_a_huge_file_fail_unread_with_their_reasons_and_the_batch_ends() {
    let dir = Scratch::new("poison-pipe");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let good = samples(&input, 20, 24);
    let status = std::process::Command::new("mkfifo")
        .arg(dir.path("pipe"))
        .status()
        .unwrap();
    assert!(status.success(), "mkfifo");
    std::os::unix::fs::symlink(dir.path("pipe"), input.join("poison.png")).unwrap();
    let huge = std::fs::File::create(input.join("huge.png")).unwrap();
    huge.set_len(1536 << 20).unwrap();
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
            "3",
        ],
    );
    let workers = [worker(&connect, "w1", &[]), worker(&connect, "w2", &[])];
    let started = Instant::now();
    let mut peak = 0;
    while !m.exited() && started.elapsed() < Duration::from_secs(45) {
        for w in &workers {
            peak = peak.max(peak_rss_mib(w.pid()).unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = exit_within(&mut m, Duration::from_secs(1)).unwrap_or_else(|| {
        panic!(
            "the master did not end the batch within 45 s; stderr:\n{}",
            m.stderr()
        )
    });
    eprintln!(
        "ended in {:?}, worker peak RSS {peak} MiB",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(3), "{}", m.stderr());
    let s = m.summary();
    assert_eq!((count(&s, "done"), count(&s, "failed")), (20, 2), "{s}");
    let mut failed = reasons(&s);
    failed.sort();
    assert_eq!(failed[0].0, "huge.png", "{s}");
    assert!(failed[0].1.contains("refused without reading"), "{s}");
    assert_eq!(failed[1].0, "poison.png", "{s}");
    assert!(failed[1].1.contains("named pipe"), "{s}");
    assert!(
        peak < 200,
        "a worker read the huge file: peak RSS {peak} MiB"
    );
    assert_outputs(&output, &good);
}

/// Case 9, the delivery limit: an image that never finishes in any worker (the workers'
/// `--stall-on` test hook; a read stuck on a hung mount behaves the same) costs an attempt at
/// each task timeout, and after `--max-attempts` it fails with the reasons; each worker abandons
/// it at the timeout and its slot serves the other images (one slot each here: without that,
/// both would be stuck for good).
#[test]
fn an_image_that_never_finishes_fails_after_max_attempts_and_frees_its_slots() {
    let dir = Scratch::new("poison-stall");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let good = samples(&input, 12, 24);
    image::RgbImage::new(8, 8)
        .save(input.join("a-stuck.png"))
        .unwrap();
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
            "2",
            "--max-attempts",
            "3",
        ],
    );
    let one_slot = ["--stall-on", "stuck", "--prefetch", "0", "--delay-ms", "50"];
    let _w1 = worker(&connect, "w1", &one_slot);
    let _w2 = worker(&connect, "w2", &one_slot);
    let status = exit_within(&mut m, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no end within 60 s; stderr:\n{}", m.stderr()));
    assert_eq!(status.code(), Some(3), "{}", m.stderr());
    let s = m.summary();
    eprintln!("{s}");
    assert_eq!((count(&s, "done"), count(&s, "failed")), (12, 1), "{s}");
    let failed = reasons(&s);
    assert_eq!(failed[0].0, "a-stuck.png", "{s}");
    assert!(
        failed[0].1.starts_with("gave up after 3 attempts") && failed[0].1.contains("task timeout"),
        "{s}"
    );
    assert_outputs(&output, &good);
}

/// A process run under `strace` with every `fsync` delayed by `delay`; the traced process is
/// killed with it.
struct Traced(Proc);

impl Traced {
    fn spawn(delay: Duration, bin: &str, args: &[&str]) -> Self {
        let inject = format!("inject=fsync:delay_enter={}", delay.as_micros());
        let mut all = vec![
            "-f",
            "--seccomp-bpf",
            "-o",
            "/dev/null",
            "-e",
            "trace=fsync",
            "-e",
            &inject,
            bin,
        ];
        all.extend_from_slice(args);
        Self(Proc::spawn("strace", &all))
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        // strace killed leaves its tracee running: kill that first.
        let pid = self.0.pid();
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace() {
                let _ = std::process::Command::new("kill")
                    .args(["-9", child])
                    .status();
            }
        }
    }
}

fn require_strace() {
    let ok = std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "strace is required here");
}

/// Case 10: batch A's cleanup removed every `*.pipeline-tmp` under the output tree, including
/// the temp file of batch B's worker, in progress (its fsync slowed): B failed `b0000.png`
/// ("No such file or directory"), exit 3. A batch now removes only its own temp files.
#[test]
#[cfg_attr(strace_missing, ignore = "strace is not installed")]
fn a_batch_finishing_keeps_another_batchs_temp_files() {
    require_strace();
    let dir = Scratch::new("two-batches");
    let (in_a, in_b, output) = (dir.path("in-a"), dir.path("in-b"), dir.path("out"));
    std::fs::create_dir_all(&in_b).unwrap();
    image::RgbImage::from_pixel(16, 16, image::Rgb([10, 200, 30]))
        .save(in_b.join("b0000.png"))
        .unwrap();
    let expected_a = samples(&in_a, 4, 16);
    let (mut b, connect_b) = master(&in_b, &output, &["--filter", "invert", "--stop-workers"]);
    let worker_args = [
        "--connect",
        &connect_b,
        "--id",
        "wB",
        "--heartbeat-ms",
        "250",
        "--liveness",
        "4",
    ];
    // B's worker: every fsync takes 4 s, so its temp file lives at least that long.
    let _wb = Traced::spawn(Duration::from_secs(4), worker_bin(), &worker_args);
    wait_until("batch B's temp file", || {
        !pipeline::files::temp_files(&output).is_empty()
    });
    let (mut a, connect_a) = master(&in_a, &output, &["--filter", "invert", "--stop-workers"]);
    let _wa = worker(&connect_a, "wA", &[]);
    assert!(a.wait().success(), "batch A failed: {}", a.stderr());
    assert!(
        !pipeline::files::temp_files(&output).is_empty(),
        "batch A removed batch B's temp file"
    );
    let status = b.wait();
    assert!(status.success(), "batch B failed: {}", b.stderr());
    let s = b.summary();
    assert_eq!((count(&s, "done"), count(&s, "failed")), (1, 0), "{s}");
    let mut expected = expected_a;
    expected.push("b0000.png".into());
    expected.sort();
    assert_outputs(&output, &expected);
}

fn bytes_path(dir: &Path, name: &[u8]) -> PathBuf {
    dir.join(OsString::from_vec(name.to_vec()))
}

/// Case 11: names that are not UTF-8 (`caf\xe9.png` failed "No such file"; `\xff\xfe.png` and
/// `\xfe\xff.png` collided), a linked folder (listed as one "not an image" file, its images
/// skipped) and a link looping back to its ancestor. Every file is now listed and its output
/// named right, byte for byte; the loop is not walked.
#[test]
fn every_file_is_listed_and_named_right() {
    let dir = Scratch::new("names");
    let (input, archive, output) = (dir.path("in"), dir.path("archive"), dir.path("out"));
    std::fs::create_dir_all(input.join("sub")).unwrap();
    std::fs::create_dir_all(&archive).unwrap();
    // Each input a solid colour of its own; the filter inverts it.
    let inputs: Vec<(PathBuf, [u8; 3])> = vec![
        (input.join("plain.png"), [10, 20, 30]),
        (bytes_path(&input, b"caf\xe9.png"), [200, 10, 10]),
        (bytes_path(&input, b"\xff\xfe.png"), [10, 200, 10]),
        (bytes_path(&input, b"\xfe\xff.png"), [10, 10, 200]),
        (archive.join("x1.png"), [50, 60, 70]),
        (archive.join("x2.png"), [80, 90, 100]),
        (archive.join("x3.png"), [110, 120, 130]),
    ];
    for (path, rgb) in &inputs {
        image::RgbImage::from_pixel(8, 8, image::Rgb(*rgb))
            .save_with_format(path, image::ImageFormat::Png)
            .unwrap();
    }
    std::os::unix::fs::symlink(&archive, input.join("2023")).unwrap();
    std::os::unix::fs::symlink("..", input.join("sub/loop")).unwrap();
    let (mut m, connect) = master(&input, &output, &["--filter", "invert", "--stop-workers"]);
    let _w = worker(&connect, "w1", &[]);
    let status = m.wait();
    let s = m.summary();
    assert!(status.success(), "{s}\n{}", m.stderr());
    assert_eq!((count(&s, "total"), count(&s, "done")), (7, 7), "{s}");
    for (path, rgb) in &inputs {
        let rel = match path.strip_prefix(&input) {
            Ok(rel) => rel.to_path_buf(),
            Err(_) => Path::new("2023").join(path.file_name().unwrap()),
        };
        let out = output.join(&rel);
        let img = image::open(&out)
            .unwrap_or_else(|e| panic!("{} has no output: {e}; {s}", rel.display()))
            .to_rgb8();
        let want = rgb.map(|c| 255 - c);
        assert_eq!(
            img.get_pixel(4, 4).0,
            want,
            "{} is not its own input",
            rel.display()
        );
    }
    // Beside the job's record and journal (`pipeline::job`), never listed as outputs.
    let mut names: Vec<OsString> = std::fs::read_dir(&output)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.as_bytes().starts_with(pipeline::job::JOB_FILE.as_bytes()))
        .collect();
    names.sort();
    assert_eq!(names.len(), 5, "4 outputs and the 2023 folder: {names:?}");
}

/// Case 11: `--output` equal to `--input` processed nothing and exited 0; inside it, outputs
/// would land among the inputs. Both are one clear line now, exit 1, nothing written.
#[test]
fn output_equal_to_or_inside_input_is_a_clear_error() {
    let dir = Scratch::new("inside");
    let input = dir.path("in");
    samples(&input, 2, 16);
    for output in [input.clone(), input.join("out"), input.join("./x/../y")] {
        let o = std::process::Command::new(master_bin())
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .args([
                "--tasks-bind",
                "tcp://127.0.0.1:0",
                "--results-bind",
                "tcp://127.0.0.1:0",
                "--control-bind",
                "tcp://127.0.0.1:0",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{}: {stderr}", output.display());
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(
            errors[0].contains("--output") && errors[0].contains("inside"),
            "{stderr}"
        );
        assert!(o.stdout.is_empty());
    }
    let mut left: Vec<String> = std::fs::read_dir(&input)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert!(
        !left.iter().any(|n| n == "out" || n == "y"),
        "created: {left:?}"
    );
}

/// Case 12: inline mode waited for each output write (two fsyncs) inside the master's loop: with
/// fsync slowed to 1 s both workers took the master for silent and reconnected, and tasks were
/// re-sent. Writes now run off the loop: no false "master silent", nothing re-sent.
#[test]
#[cfg_attr(strace_missing, ignore = "strace is not installed")]
fn slow_output_writes_raise_no_false_master_silent() {
    require_strace();
    let dir = Scratch::new("slow-fsync");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 12, 24);
    let (input_s, output_s) = (input.to_str().unwrap(), output.to_str().unwrap());
    let args = [
        "--input",
        input_s,
        "--output",
        output_s,
        "--tasks-bind",
        "tcp://127.0.0.1:0",
        "--results-bind",
        "tcp://127.0.0.1:0",
        "--control-bind",
        "tcp://127.0.0.1:0",
        "--heartbeat-ms",
        "250",
        "--liveness",
        "4",
        "--json",
        "--transfer",
        "inline",
        "--filter",
        "invert",
        "--stop-workers",
        "--min-workers",
        "2",
    ];
    let mut m = Traced::spawn(Duration::from_secs(1), master_bin(), &args);
    let connect = m.0.ready()["connect"].clone();
    // Liveness window of these workers: 4 x 250 ms, far less than one slowed write.
    let mut w1 = worker(&connect, "w1", &[]);
    let mut w2 = worker(&connect, "w2", &[]);
    let status = exit_within(&mut m.0, Duration::from_secs(80))
        .unwrap_or_else(|| panic!("no end within 80 s; stderr:\n{}", m.0.stderr()));
    assert!(status.success(), "master failed: {}", m.0.stderr());
    let s = m.0.summary();
    eprintln!("{s}");
    assert!(w1.wait().success() && w2.wait().success());
    for w in [&w1, &w2] {
        let silent = w.stderr().matches("master silent").count();
        assert_eq!(
            silent,
            0,
            "{} took the master for silent:\n{}",
            w.name,
            w.stderr()
        );
    }
    assert_eq!((count(&s, "done"), count(&s, "resent")), (12, 0), "{s}");
    assert_outputs(&output, &expected);
}
