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
