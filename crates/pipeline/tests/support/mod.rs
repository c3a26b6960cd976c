//! Process-test support: scratch directories, and children that are killed on drop and whose
//! stderr is printed when a test fails.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Generous: the machine has 2 cores shared with compilers.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// A directory removed on drop.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let n: u64 = rand_suffix();
        let dir =
            std::env::temp_dir().join(format!("pipeline-test-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

/// A running binary of this package.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr_path: PathBuf,
    _stderr_dir: Scratch,
    pub stdout: Vec<String>,
}

impl Proc {
    pub fn spawn(bin: &str, args: &[&str]) -> Self {
        let stderr_dir = Scratch::new("stderr");
        let stderr_path = stderr_dir.path("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "pipeline=debug,common=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            name: Path::new(bin)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            child,
            lines: rx,
            stderr_path,
            _stderr_dir: stderr_dir,
            stdout: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits for the `ready k=v ...` line and returns its fields.
    pub fn ready(&mut self) -> BTreeMap<String, String> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    if let Some(fields) = common::ready::parse(&line) {
                        return fields;
                    }
                }
                Err(_) => panic!(
                    "{} printed no ready line; stderr:\n{}",
                    self.name,
                    self.stderr()
                ),
            }
        }
    }

    /// Waits until the process prints `line` on stdout.
    pub fn wait_line(&mut self, line: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(got) => {
                    self.stdout.push(got.clone());
                    if got == line {
                        return;
                    }
                }
                Err(_) => panic!(
                    "{} never printed {line:?}; stderr:\n{}",
                    self.name,
                    self.stderr()
                ),
            }
        }
    }

    /// Whether the process has exited (without waiting).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_some()
    }

    /// Waits for the process to exit; collects the rest of stdout.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The reader thread ends at EOF; take everything it has.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.stdout.push(line);
                }
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit in time; stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last stdout line parsed as JSON (the `--json` summary).
    pub fn summary(&self) -> serde_json::Value {
        let last = self.stdout.last().cloned().unwrap_or_default();
        serde_json::from_str(&last).unwrap_or_else(|e| {
            panic!(
                "last stdout line {last:?} is not JSON ({e}); stderr:\n{}",
                self.stderr()
            )
        })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} (pid {}) stderr -----\n{}",
                self.name,
                self.pid(),
                self.stderr()
            );
        }
        self.kill();
    }
}

pub fn master_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pipeline")
}

pub fn worker_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pipeline-worker")
}

/// Starts a master on port-0 endpoints with `--json` and short heartbeats.
pub fn master(input: &Path, output: &Path, extra: &[&str]) -> (Proc, String) {
    let any = "tcp://127.0.0.1:0".to_string();
    master_on(&[any.clone(), any.clone(), any], input, output, extra)
}

pub fn worker(connect: &str, id: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--connect",
        connect,
        "--id",
        id,
        "--heartbeat-ms",
        "250",
        "--liveness",
        "4",
    ];
    args.extend_from_slice(extra);
    Proc::spawn(worker_bin(), &args)
}

/// Polls `cond` until it holds or the deadline passes.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every file under `dir`, relative, sorted, temp files included: tests check there are none.
pub fn files_under(dir: &Path) -> Vec<String> {
    let outputs = pipeline::files::list_files(dir, None).unwrap_or_default();
    let temps = pipeline::files::temp_files(dir);
    let mut out: Vec<String> = outputs
        .iter()
        .map(|p| p.as_path())
        .chain(temps.iter().filter_map(|p| p.strip_prefix(dir).ok()))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// Writes `n` sample images of about `side` pixels into `dir`; returns their relative paths.
pub fn samples(dir: &Path, n: usize, side: u32) -> Vec<String> {
    let mut v = pipeline::sample::generate(dir, n, side).expect("samples");
    v.sort();
    v
}

/// The outputs match the inputs one for one, decode, and there is no temp file.
pub fn assert_outputs(output: &Path, expected: &[String]) {
    let got = files_under(output);
    assert_eq!(got, expected, "output files differ from inputs");
    for rel in expected {
        image::open(output.join(rel)).unwrap_or_else(|e| panic!("{rel} does not decode: {e}"));
    }
}

/// Established TCP connections of process `pid` to the local port `port` (read from `/proc`),
/// as socket inode numbers: a connection keeps its inode for as long as it lives.
pub fn connections_to(pid: u32, port: u16) -> Vec<String> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|link| {
                    let l = link.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[")
                        .and_then(|rest| rest.strip_suffix(']'))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let port_hex = format!(":{port:04X}");
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        .filter(|cols| {
            cols.len() > 9
                && cols[2].ends_with(&port_hex)
                && cols[3] == "01"
                && inodes.contains(&cols[9])
        })
        .map(|cols| cols[9].clone())
        .collect()
}

/// `n` free loopback ports, as `tcp://` endpoints, for masters that must restart on the same ones.
pub fn free_endpoints(n: usize) -> Vec<String> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| format!("tcp://{}", l.local_addr().unwrap()))
        .collect()
}

/// A master on the given endpoints (tasks, results, control) with the test timing (250 ms x 4
/// unless `extra` says otherwise) and `--json`; returns it once ready, with its `connect=`.
pub fn master_on(eps: &[String], input: &Path, output: &Path, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "--input",
        input.to_str().expect("utf-8 path"),
        "--output",
        output.to_str().expect("utf-8 path"),
        "--tasks-bind",
        &eps[0],
        "--results-bind",
        &eps[1],
        "--control-bind",
        &eps[2],
        "--heartbeat-ms",
        "250",
        "--json",
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--liveness") {
        args.extend_from_slice(&["--liveness", "4"]);
    }
    let mut m = Proc::spawn(master_bin(), &args);
    let connect = m.ready()["connect"].clone();
    (m, connect)
}

/// The port of a `tcp://host:port` endpoint.
pub fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

/// A loopback TCP relay in front of one endpoint that can turn every connection it carries into
/// a black hole (bytes read and dropped both ways, nothing closed: a partition without socket
/// events), while connections made afterwards are relayed normally.
#[derive(Debug)]
pub struct Relay {
    pub endpoint: String,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    pub fn start(upstream: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("tcp://{}", listener.local_addr().unwrap());
        let target = upstream.trim_start_matches("tcp://").to_string();
        let generation = Arc::new(AtomicU64::new(0));
        let gen = generation.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let born = gen.load(Ordering::SeqCst);
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let gen = gen.clone();
                    std::thread::spawn(move || pipe(from, to, &gen, born));
                }
            }
        });
        Self {
            endpoint,
            generation,
        }
    }

    /// Every connection open now goes silent for good.
    pub fn blackhole(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn pipe(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    gen: &std::sync::atomic::AtomicU64,
    born: u64,
) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                if gen.load(std::sync::atomic::Ordering::SeqCst) == born {
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    return;
                }
                // A black hole passes no close either: keep `to` open until the test ends.
                std::thread::sleep(Duration::from_secs(3600));
                return;
            }
            Ok(n) => n,
        };
        if gen.load(std::sync::atomic::Ordering::SeqCst) == born && to.write_all(&buf[..n]).is_err()
        {
            return;
        }
    }
}

/// A count of the JSON summary.
pub fn count(summary: &serde_json::Value, field: &str) -> u64 {
    summary[field]
        .as_u64()
        .unwrap_or_else(|| panic!("summary has no {field}: {summary}"))
}

/// How many images the summary credits to worker `id`.
pub fn by_worker(summary: &serde_json::Value, id: &str) -> u64 {
    summary["by_worker"][id].as_u64().unwrap_or(0)
}
