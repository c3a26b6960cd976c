//! The lab's command line: listing, unknown scenarios, `--help` of its binaries.

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin).args(args).output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_on_every_binary() {
    for bin in [
        env!("CARGO_BIN_EXE_lab"),
        env!("CARGO_BIN_EXE_lab-bench"),
        env!("CARGO_BIN_EXE_echo"),
    ] {
        let (code, out, _) = run(bin, &["--help"]);
        assert_eq!(code, 0, "{bin} --help");
        assert!(out.contains("Usage:"), "{bin}: {out}");
    }
}

#[test]
fn lists_every_seed_experiment() {
    let (code, out, _) = run(env!("CARGO_BIN_EXE_lab"), &["--list"]);
    assert_eq!(code, 0);
    for name in [
        "one-worker",
        "two-workers",
        "broker-restart",
        "partition",
        "worker-crash",
        "worker-hang",
        "pipeline-one-worker",
        "pipeline-workers",
        "pipeline-worker-crash",
        "pipeline-corrupt",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(name)),
            "{name} missing from:\n{out}"
        );
    }
}

#[test]
fn rejects_unknown_scenarios_and_flags() {
    let (code, _, err) = run(
        env!("CARGO_BIN_EXE_lab"),
        &["--no-build", "no-such-scenario"],
    );
    assert_eq!(code, 1);
    assert!(err.starts_with("error: unknown scenario"), "{err}");
    let (code, _, _) = run(
        env!("CARGO_BIN_EXE_lab"),
        &["--partition", "carrier-pigeon"],
    );
    assert_eq!(code, 2);
}

/// `lab` run on one scenario, with its logs and report under the target directory.
fn lab_once(args: &[&str]) -> (i32, String, String) {
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_lab"));
    let dir = exe
        .parent()
        .expect("target directory")
        .join("test-logs")
        .join(format!("cli-{}", args.join("-")));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(&exe)
        .args(args)
        .env("LAB_LOG_DIR", dir.join("logs"))
        .env("LAB_REPORT_DIR", dir.join("report"))
        .output()
        .expect("lab runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_tour_narrates_then_tabulates_and_json_is_verdicts_alone() {
    let (code, out, err) = lab_once(&["one-worker"]);
    assert_eq!(code, 0, "{out}\n{err}");
    // Narration on stderr, each step with its time since the scenario's start, in order.
    let steps: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("  +") && l.contains("s "))
        .collect();
    let started = steps
        .iter()
        .position(|l| l.ends_with(")") && l.contains(" w1 started (pid "));
    let exited = steps
        .iter()
        .position(|l| l.contains(" client exited with status 0"));
    assert!(
        matches!((started, exited), (Some(a), Some(b)) if a < b),
        "narration:\n{err}"
    );
    // One summary table on stdout, with the scenario's row and its key figures.
    let header = out
        .lines()
        .position(|l| l.starts_with("scenario") && l.contains("seed experiment"))
        .unwrap_or_else(|| panic!("no table in:\n{out}"));
    let row: Vec<&str> = out
        .lines()
        .nth(header + 2)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        row,
        [
            "one-worker",
            "Shared",
            "Queue",
            "1",
            "PASS",
            "(processes)",
            "200",
            "200",
            "0",
            "0",
            "-",
            "-"
        ],
        "{out}"
    );
    assert!(err.contains("report: "), "{err}");

    let (code, out, err) = lab_once(&["--json", "one-worker"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "stdout is the verdicts alone:\n{out}");
    let verdict: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON verdict");
    assert_eq!(verdict["scenario"], "one-worker");
    assert_eq!(verdict["passed"], true);
    assert!(
        !err.contains(" started (pid "),
        "no narration with --json:\n{err}"
    );
}
