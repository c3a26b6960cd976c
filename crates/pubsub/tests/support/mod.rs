//! Test support: start the real binaries on free ports, read their ready lines and JSON
//! summaries, and serialise the heavy tests so that their figures are not distorted by each
//! other on 2 cores.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lab::process::Proc;
use lab::Signal;
use serde::Deserialize;
use tokio::sync::{Mutex, MutexGuard};

pub const PROXY: &str = env!("CARGO_BIN_EXE_proxy");
pub const PUBLISHER: &str = env!("CARGO_BIN_EXE_publisher");
pub const SUBSCRIBER: &str = env!("CARGO_BIN_EXE_subscriber");

/// Generous: the machine may be busy.
pub const READY_WITHIN: Duration = Duration::from_secs(30);
pub const EXIT_WITHIN: Duration = Duration::from_secs(60);

static HEAVY: Mutex<()> = Mutex::const_new(());

/// Held by each process test: one at a time.
pub async fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// A fresh log directory for one test.
pub fn logs(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("pubsub-logs")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Free ports on loopback.
pub const LOOPBACK: &str = "tcp://127.0.0.1:0";

/// A running proxy and its endpoints.
pub struct Proxy {
    pub proc: Proc,
    pub xsub: String,
    pub xpub: String,
}

/// Starts a proxy on the given endpoints (`tcp://127.0.0.1:0` for free ports) and waits for
/// its ready line.
pub async fn proxy(logs: &Path, name: &str, xsub: &str, xpub: &str, extra: &[&str]) -> Proxy {
    let mut args = strings(&["--xsub", xsub, "--xpub", xpub]);
    args.extend(strings(extra));
    let mut proc = Proc::spawn(name, Path::new(PROXY), &args, logs).expect("proxy starts");
    let ready = proc.ready(READY_WITHIN).await.expect("proxy ready");
    Proxy {
        proc,
        xsub: ready["xsub"].clone(),
        xpub: ready["xpub"].clone(),
    }
}

/// A proxy on free loopback ports printing its stats as JSON every second, with extra flags.
pub async fn proxy_with_stats(logs: &Path, extra: &[&str]) -> Proxy {
    let mut flags = vec!["--json", "--stats-secs", "1"];
    flags.extend_from_slice(extra);
    proxy(logs, "proxy", LOOPBACK, LOOPBACK, &flags).await
}

/// Waits until the proxy counts `n` subscribers of `prefix`, and no other prefix.
pub async fn await_topic(proxy: &Proc, prefix: &str, n: u64) -> pubsub::ProxyStats {
    let want = [(prefix.to_string(), n)];
    await_stats(proxy, READY_WITHIN, |s| s.topics == want).await
}

/// Starts a subscriber printing its JSON summary and waits until it hears the proxy (every
/// subscription in place).
pub async fn subscriber(logs: &Path, name: &str, xpub: &str, zips: &str, extra: &[&str]) -> Proc {
    let mut args = strings(&["--connect", xpub, "--zip", zips, "--json"]);
    args.extend(strings(extra));
    let mut proc = Proc::spawn(name, Path::new(SUBSCRIBER), &args, logs).expect("subscriber");
    proc.ready(READY_WITHIN).await.expect("subscriber ready");
    proc
}

/// Starts a publisher (JSON summary) without waiting.
pub fn publisher(logs: &Path, name: &str, xsub: &str, extra: &[&str]) -> Proc {
    let mut args = strings(&["--connect", xsub, "--id", name, "--json"]);
    args.extend(strings(extra));
    Proc::spawn(name, Path::new(PUBLISHER), &args, logs).expect("publisher")
}

/// A publisher of `zips` at `rate` updates/s that waits up to 20 s for a first subscriber.
pub fn feed(logs: &Path, name: &str, xsub: &str, zips: &str, rate: u32, extra: &[&str]) -> Proc {
    let rate = rate.to_string();
    let mut args = vec![
        "--zips",
        zips,
        "--rate",
        &rate,
        "--wait-subscriber-ms",
        "20000",
    ];
    args.extend_from_slice(extra);
    publisher(logs, name, xsub, &args)
}

/// Proves the proxy serves: a fresh subscriber of zip 10001 takes `count` updates from a fresh
/// publisher at 500 updates/s. Returns what the subscriber counted.
pub async fn serves(logs: &Path, px: &Proxy, count: u64) -> pubsub::SubscriberSummary {
    let count = count.to_string();
    let mut s = subscriber(logs, "sub", &px.xpub, "10001", &["--count", &count]).await;
    let mut p = feed(logs, "p1", &px.xsub, "10001", 500, &[]);
    let got = summary(&mut s).await;
    let _: pubsub::PublisherSummary = stop(&mut p).await;
    got
}

/// Waits for a child to exit 0 and reads its JSON summary.
pub async fn summary<T: serde::de::DeserializeOwned>(proc: &mut Proc) -> T {
    let status = proc.wait(EXIT_WITHIN).await.expect("exits");
    assert!(
        status.success(),
        "{} failed\n{}",
        proc.name,
        proc.log_tail()
    );
    proc.json()
        .unwrap_or_else(|e| panic!("{e:#}\n{}", proc.log_tail()))
}

/// SIGTERM, then the summary.
pub async fn stop<T: serde::de::DeserializeOwned>(proc: &mut Proc) -> T {
    proc.signal(Signal::SIGTERM).expect("signal");
    summary(proc).await
}

/// The proxy's stats lines (`--json`) so far.
pub fn proxy_stats(proxy: &Proc) -> Vec<pubsub::ProxyStats> {
    proxy
        .stdout()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Polls the proxy's stats lines until one satisfies `ok`, for at most `within`.
pub async fn await_stats(
    proxy: &Proc,
    within: Duration,
    ok: impl Fn(&pubsub::ProxyStats) -> bool,
) -> pubsub::ProxyStats {
    let until = tokio::time::Instant::now() + within;
    loop {
        if let Some(s) = proxy_stats(proxy).into_iter().rev().find(|s| ok(s)) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no proxy stats line as expected within {within:?}: {:?}\n{}",
            proxy_stats(proxy).last(),
            proxy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fails the test when pyzmq cannot be imported: a run that gets here means to test interop
/// (without pyzmq the tests are ignored at build time, see `build.rs`).
pub fn require_pyzmq() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import zmq"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "pyzmq is required here (pip install pyzmq)");
}

/// A script of `tests/py` at the workspace root.
pub fn script(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/py")
        .join(name)
        .display()
        .to_string()
}

/// Starts a Python script with arguments.
pub fn python(logs: &Path, name: &str, script_name: &str, args: &[&str]) -> Proc {
    let mut all = vec![script(script_name)];
    all.extend(strings(args));
    Proc::spawn(name, Path::new("python3"), &all, logs).expect("python3 starts")
}

/// A script of this crate's `tests/py`.
pub fn py(logs: &Path, name: &str, script: &str, args: &[&str]) -> Proc {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let mut all = vec![path.display().to_string()];
    all.extend(strings(args));
    Proc::spawn(name, Path::new("python3"), &all, logs).expect("python3 starts")
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// What `stock_subs.py` prints.
#[derive(Debug, Deserialize)]
pub struct StockSubs {
    pub start_unix_ms: u64,
    pub bucket_ms: u64,
    pub zips: std::collections::BTreeMap<String, StockSub>,
}

#[derive(Debug, Deserialize)]
pub struct StockSub {
    pub received: u64,
    pub wrong: u64,
    pub first_ms: Option<u64>,
    pub counts: Vec<u64>,
}

impl StockSubs {
    /// Updates of `zip` received between the two unix times (whole buckets).
    pub fn between(&self, zip: &str, from_ms: u64, to_ms: u64) -> u64 {
        let bucket = |t: u64| (t.saturating_sub(self.start_unix_ms) / self.bucket_ms) as usize;
        let counts = &self.zips[zip].counts;
        let (a, b) = (bucket(from_ms), bucket(to_ms).min(counts.len()));
        counts.get(a..b).map_or(0, |c| c.iter().sum())
    }
}
