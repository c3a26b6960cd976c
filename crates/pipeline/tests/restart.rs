//! Issue 20 (pipeline): the master's host lost mid-batch. The master is SIGKILLed after some but
//! not all images are done, and a new master is started on the same input, output and ports:
//! it finishes the batch (exit 0) without doing again the images already done (their files keep
//! their inode and time stamp), every image has exactly one output, none is lost, and the temp
//! files of the killed batch are removed, never taken for outputs.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use support::*;

const IMAGES: usize = 24;

/// The images the job's journal names as done (the master's own record, see `pipeline::job`).
fn journaled(output: &Path) -> BTreeSet<String> {
    let mut done = BTreeSet::new();
    for entry in std::fs::read_dir(output).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(pipeline::job::JOB_FILE) && name.ends_with(".done") {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            done.extend(
                text.lines()
                    .filter_map(|l| serde_json::from_str::<String>(l).ok()),
            );
        }
    }
    done
}

/// Each output's inode and modification time (ns): a file written again gets a new inode (the
/// rename of a new temp file) and a new time.
fn stamps(output: &Path) -> BTreeMap<String, (u64, i64)> {
    pipeline::files::list_files(output, None)
        .unwrap()
        .into_iter()
        .map(|rel| {
            let m = std::fs::metadata(output.join(&rel)).unwrap();
            (
                rel.display().to_string(),
                (m.ino(), m.mtime() * 1_000_000_000 + m.mtime_nsec()),
            )
        })
        .collect()
}

/// With `elsewhere`, the worker goes down with the master's host and the new master binds other
/// ports, with a new worker: nothing of the old batch but its output directory is left.
fn master_killed_mid_batch_then_restarted(transfer: &str, elsewhere: bool) {
    let dir = Scratch::new(&format!("master-restart-{transfer}-{elsewhere}"));
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, IMAGES, 48);
    let eps = free_endpoints(3);
    let args = ["--transfer", transfer, "--filter", "grayscale"];
    let (mut first, _) = master_on(&eps, &input, &output, &args);
    let batch1 = first.stdout.last().cloned().unwrap();
    let batch1 = common::ready::parse(&batch1).unwrap()["batch"].clone();
    // One slow worker: about 150 ms an image, one running and one prefetched.
    let mut w = worker(&eps.join(","), "w1", &["--delay-ms", "150"]);
    wait_until("a third of the outputs", || {
        pipeline::files::list_files(&output, None).unwrap().len() >= IMAGES / 3
    });
    first.kill(); // SIGKILL: the host is gone, nothing flushed, no summary.
    let eps = if elsewhere {
        w.kill();
        let new = free_endpoints(3);
        w = worker(&new.join(","), "w2", &["--delay-ms", "150"]);
        new
    } else {
        eps
    };
    let before = stamps(&output);
    let recorded = journaled(&output);
    assert!(
        (IMAGES / 3..IMAGES).contains(&before.len()),
        "killed mid-batch: {} of {IMAGES} done",
        before.len()
    );
    // What the master recorded is on disk; on disk and not recorded is at most what was in
    // flight at the kill: the worker's two slots (one running, one prefetched) and its report.
    assert!(
        recorded.iter().all(|r| before.contains_key(r)),
        "{recorded:?}"
    );
    assert!(
        before.len() - recorded.len() <= 2,
        "{} outputs, {} recorded",
        before.len(),
        recorded.len()
    );
    // A worker of the killed batch dying mid-write leaves its temp file (or the master, inline).
    let last = output.join(expected.last().unwrap());
    let leftover = last.parent().unwrap().join(format!(
        ".{}.{}-4242-0{}",
        last.file_name().unwrap().to_str().unwrap(),
        pipeline::files::temp_tag(&batch1, "w0"),
        pipeline::files::TEMP_SUFFIX
    ));
    std::fs::write(&leftover, b"half an image").unwrap();

    // Started again on the same input, output and ports; the worker reconnects by itself.
    let (mut second, _) = master_on(&eps, &input, &output, &args);
    let ready = common::ready::parse(&second.stdout[0]).unwrap();
    assert_eq!(ready["total"], IMAGES.to_string());
    let skipped: usize = ready["skipped"].parse().unwrap();
    assert_eq!(skipped, recorded.len(), "{ready:?}, {recorded:?}");
    assert!(second.wait().success(), "{}", second.stderr());
    let s = second.summary();
    assert_eq!(s["resumed"], true, "{s}");
    assert_eq!(count(&s, "skipped_done"), skipped as u64, "{s}");
    assert_eq!(count(&s, "total"), IMAGES as u64, "{s}");
    assert_eq!(count(&s, "failed"), 0, "{s}");
    assert_eq!(
        count(&s, "done") + count(&s, "skipped_done"),
        IMAGES as u64,
        "every image done once, by one batch or the other: {s}"
    );
    // None of the images done before the kill was processed again: same file, same time.
    let after = stamps(&output);
    for rel in &recorded {
        assert_eq!(after.get(rel), before.get(rel), "{rel} was written again");
    }
    assert_eq!(count(&s, "done"), (IMAGES - recorded.len()) as u64, "{s}");
    // Exactly one output per input, each decoding; no temp file (the leftover is gone).
    assert!(!leftover.exists(), "the killed batch's temp file is left");
    assert_outputs(&output, &expected);
    for rel in &expected {
        let img = image::open(output.join(rel)).unwrap().to_rgb8();
        let px = img.get_pixel(img.width() / 2, img.height() / 2);
        let spread = px.0.iter().max().unwrap() - px.0.iter().min().unwrap();
        assert!(spread <= 3, "{rel} is not gray: {px:?}");
    }

    // Started once more: the job is complete, nothing is sent.
    let (mut third, _) = master_on(&eps, &input, &output, &args);
    assert!(third.wait().success(), "{}", third.stderr());
    let s = third.summary();
    assert_eq!(
        (count(&s, "done"), count(&s, "skipped_done")),
        (0, IMAGES as u64),
        "{s}"
    );
    assert_eq!(stamps(&output), after, "a complete job was written again");
    // --redo does it all again.
    let mut redo_args = args.to_vec();
    redo_args.extend(["--redo", "--stop-workers"]);
    let (mut redo, _) = master_on(&eps, &input, &output, &redo_args);
    assert!(redo.wait().success(), "{}", redo.stderr());
    let s = redo.summary();
    assert_eq!(
        (count(&s, "done"), count(&s, "skipped_done")),
        (IMAGES as u64, 0),
        "{s}"
    );
    assert_outputs(&output, &expected);
    assert!(w.wait().success(), "{}", w.stderr());
}

#[test]
fn a_master_killed_mid_batch_is_finished_by_the_next_path_mode() {
    master_killed_mid_batch_then_restarted("path", false);
}

#[test]
fn a_master_and_its_worker_lost_mid_batch_are_replaced_elsewhere() {
    master_killed_mid_batch_then_restarted("path", true);
}

#[test]
fn a_master_killed_mid_batch_is_finished_by_the_next_inline() {
    master_killed_mid_batch_then_restarted("inline", false);
}

/// Another filter on the same output is another job: every image is done again (the outputs of
/// the killed job are not this one's), and a job killed twice still finishes.
#[test]
fn another_filter_is_another_job_and_a_twice_killed_job_finishes() {
    let dir = Scratch::new("master-restart-other");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 12, 32);
    let eps = free_endpoints(3);
    let mut w = worker(&eps.join(","), "w1", &["--delay-ms", "100"]);
    for (filter, kill_at) in [("invert", 3), ("grayscale", 3), ("grayscale", 6)] {
        let (mut m, _) = master_on(&eps, &input, &output, &["--filter", filter]);
        let start = stamps(&output);
        wait_until("new outputs", || {
            let now = stamps(&output);
            now.iter().filter(|(k, v)| start.get(*k) != Some(v)).count() >= kill_at
        });
        m.kill();
    }
    let (mut last, _) = master_on(
        &eps,
        &input,
        &output,
        &["--filter", "grayscale", "--stop-workers"],
    );
    assert!(last.wait().success(), "{}", last.stderr());
    let s = last.summary();
    // The two grayscale masters did at least 3 + 6 - (the overlap) images; the invert one's
    // outputs never count.
    assert!(count(&s, "skipped_done") >= 6, "{s}");
    assert_eq!(count(&s, "done") + count(&s, "skipped_done"), 12, "{s}");
    assert_outputs(&output, &expected);
    for rel in &expected {
        let img = image::open(output.join(rel)).unwrap().to_rgb8();
        let px = img.get_pixel(img.width() / 2, img.height() / 2);
        let spread = px.0.iter().max().unwrap() - px.0.iter().min().unwrap();
        assert!(
            spread <= 3,
            "{rel} is not gray (an inverted output kept): {px:?}"
        );
    }
    assert!(w.wait().success(), "{}", w.stderr());
}

/// SIGKILL at any moment: masters of one job killed one after another at random moments (before
/// any output, mid-write, between an output and its journal line), then one left to finish.
/// An image the journal named at any kill is never written again, the last master skips exactly
/// what the journal names, and every image ends with exactly one output.
#[test]
fn masters_killed_at_random_moments_lose_and_redo_nothing_recorded() {
    use std::hash::{BuildHasher, RandomState};
    let dir = Scratch::new("master-restart-random");
    let (input, output) = (dir.path("in"), dir.path("out"));
    let expected = samples(&input, 60, 32);
    let eps = free_endpoints(3);
    let mut w = worker(
        &eps.join(","),
        "w1",
        &["--delay-ms", "60", "--prefetch", "2"],
    );
    let mut kept: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    for round in 0..8u64 {
        let (mut m, _) = master_on(&eps, &input, &output, &["--filter", "grayscale"]);
        let ms = RandomState::new().hash_one(round) % 600;
        std::thread::sleep(std::time::Duration::from_millis(ms));
        m.kill();
        let now = stamps(&output);
        for (rel, stamp) in &kept {
            assert_eq!(
                now.get(rel),
                Some(stamp),
                "{rel}, recorded done, was written again"
            );
        }
        for rel in journaled(&output) {
            kept.entry(rel.clone()).or_insert(now[&rel]);
        }
        eprintln!(
            "round {round}: killed {ms} ms after ready, {} recorded done",
            kept.len()
        );
    }
    let (mut last, _) = master_on(
        &eps,
        &input,
        &output,
        &["--filter", "grayscale", "--stop-workers"],
    );
    assert!(last.wait().success(), "{}", last.stderr());
    let s = last.summary();
    assert_eq!(count(&s, "skipped_done"), kept.len() as u64, "{s}");
    assert_eq!(count(&s, "done") + count(&s, "skipped_done"), 60, "{s}");
    let now = stamps(&output);
    for (rel, stamp) in &kept {
        assert_eq!(
            now.get(rel),
            Some(stamp),
            "{rel}, recorded done, was written again"
        );
    }
    assert_outputs(&output, &expected);
    assert!(w.wait().success(), "{}", w.stderr());
}
