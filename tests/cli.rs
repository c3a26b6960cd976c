//! Every binary: `--help`, one-line errors and exit codes for bad flags and bad endpoints.

use integration::run;

const BINARIES: [&str; 4] = ["broker", "worker", "client", "lab"];

#[test]
fn help_on_every_binary() {
    for bin in BINARIES {
        let (code, out, _) = run(bin, &["--help"]);
        assert_eq!(code, 0, "{bin} --help");
        assert!(out.contains("Usage:"), "{bin} --help prints usage: {out}");
    }
}

#[test]
fn unknown_flag_is_a_usage_error() {
    for bin in BINARIES {
        let (code, _, err) = run(bin, &["--no-such-flag"]);
        assert_eq!(code, 2, "{bin}");
        assert!(err.starts_with("error:"), "{bin}: {err}");
    }
}

#[test]
fn bad_endpoints_are_refused_in_one_line() {
    for (bin, flag) in [
        ("broker", "--frontend"),
        ("broker", "--backend"),
        ("worker", "--connect"),
        ("client", "--connect"),
    ] {
        let (code, _, err) = run(bin, &[flag, "localhost:5559"]);
        assert_eq!(code, 2, "{bin} {flag}");
        assert!(
            err.contains("must look like tcp://HOST:PORT"),
            "{bin}: {err}"
        );
    }
    let (code, _, err) = run("client", &["--concurrency", "0"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn broker_on_a_taken_port_fails_cleanly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("tcp://{}", taken.local_addr().expect("addr"));
    let (code, out, err) = run(
        "broker",
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

#[test]
fn lab_rejects_unknown_scenarios() {
    let (code, _, err) = run("lab", &["--no-build", "no-such-scenario"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown scenario"), "{err}");
}
