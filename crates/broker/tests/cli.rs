//! The three binaries' command lines: `--help`, one-line errors, exit codes.

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin).args(args).output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const BROKER: &str = env!("CARGO_BIN_EXE_broker");
const WORKER: &str = env!("CARGO_BIN_EXE_worker");
const CLIENT: &str = env!("CARGO_BIN_EXE_client");

#[test]
fn help_on_every_binary() {
    for bin in [BROKER, WORKER, CLIENT] {
        let (code, out, _) = run(bin, &["--help"]);
        assert_eq!(code, 0, "{bin} --help");
        assert!(out.contains("Usage:"), "{bin} --help prints usage: {out}");
    }
}

#[test]
fn unknown_flag_is_a_usage_error() {
    for bin in [BROKER, WORKER, CLIENT] {
        let (code, _, err) = run(bin, &["--no-such-flag"]);
        assert_eq!(code, 2, "{bin}");
        assert!(err.starts_with("error:"), "{bin}: {err}");
    }
}

#[test]
fn bad_endpoints_are_refused_in_one_line() {
    for (bin, flag) in [
        (BROKER, "--frontend"),
        (BROKER, "--backend"),
        (WORKER, "--connect"),
        (CLIENT, "--connect"),
    ] {
        let (code, _, err) = run(bin, &[flag, "localhost:5559"]);
        assert_eq!(code, 2, "{bin} {flag}");
        assert!(
            err.contains("must look like tcp://HOST:PORT"),
            "{bin}: {err}"
        );
    }
    let (code, _, err) = run(CLIENT, &["--concurrency", "0"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn broker_on_a_taken_port_fails_cleanly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("tcp://{}", taken.local_addr().expect("addr"));
    let (code, out, err) = run(
        BROKER,
        &["--frontend", &endpoint, "--backend", "tcp://127.0.0.1:0"],
    );
    assert_eq!(code, 1);
    assert!(out.is_empty(), "no ready line: {out}");
    let first = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(first.contains("cannot bind"), "{err}");
}
