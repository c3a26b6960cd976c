//! The three binaries' command lines: `--help`, one-line errors, exit codes.

use std::process::Command;

mod support;
use support::{PROXY, PUBLISHER, SUBSCRIBER};

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
        PROXY,
        PUBLISHER,
        SUBSCRIBER,
        env!("CARGO_BIN_EXE_pubsub-bench"),
    ] {
        let (code, out, _) = run(bin, &["--help"]);
        assert_eq!(code, 0, "{bin} --help");
        assert!(out.contains("Usage:"), "{bin} --help prints usage: {out}");
    }
}

#[test]
fn bad_flags_are_refused_in_one_line() {
    for (bin, args) in [
        (PROXY, &["--xsub", "localhost:5555"][..]),
        (PROXY, &["--xpub", "tcp://:1"][..]),
        (PUBLISHER, &["--connect", "x"][..]),
        (PUBLISHER, &["--zips", "123456"][..]),
        (PUBLISHER, &["--zip-range", "9-3"][..]),
        (PUBLISHER, &["--id", "a b"][..]),
        (PUBLISHER, &["--rate", "-1"][..]),
        (SUBSCRIBER, &["--zip", "abc"][..]),
        (SUBSCRIBER, &["--duration-s", "0"][..]),
    ] {
        let (code, out, err) = run(bin, args);
        assert_eq!(code, 2, "{bin} {args:?}: {err}");
        assert!(out.is_empty(), "{bin} {args:?} printed {out}");
        assert!(err.starts_with("error:"), "{bin} {args:?}: {err}");
    }
}

#[test]
fn proxy_on_a_taken_port_fails_cleanly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("tcp://{}", taken.local_addr().expect("addr"));
    let (code, out, err) = run(PROXY, &["--xsub", "tcp://127.0.0.1:0", "--xpub", &endpoint]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "no ready line: {out}");
    let first = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(first.contains("cannot bind"), "{err}");
}
