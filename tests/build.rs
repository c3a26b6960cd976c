//! Decides, when the tests are built, which optional tools are missing, so that a test needing
//! one shows as `ignored` (with the reason) rather than passing without running. Under CI (the
//! `CI` variable, set by `.ci/run`) nothing is ignored: a missing tool fails its test there.
//!
//! The answer is kept until this package is rebuilt: after installing pyzmq, or to run as root,
//! `touch tests/build.rs` (or run with `CI=1`).

use std::process::{Command, Stdio};

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rustc-check-cfg=cfg(no_pyzmq)");
    println!("cargo::rustc-check-cfg=cfg(no_netns)");
    if std::env::var_os("CI").is_some() {
        return;
    }
    if !succeeds("python3", &["-c", "import zmq"]) {
        println!("cargo::rustc-cfg=no_pyzmq");
    }
    // Network namespaces need root and iproute2 (`id -u` prints 0 for root).
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !(root && succeeds("ip", &["netns", "list"])) {
        println!("cargo::rustc-cfg=no_netns");
    }
}
