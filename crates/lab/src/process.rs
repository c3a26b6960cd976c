//! Real child processes: spawn, read the `ready` line and JSON summaries from stdout, signal,
//! wait with deadlines, and kill on drop. Each child's stderr goes to a log file that is
//! printed when a scenario fails. Starts, ready lines, signals and exits are recorded on the
//! running scenario's [`crate::tape`] (and so narrated); the kill on drop, a clean-up, is not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::tape::{self, Kind};

/// Where the role binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub dir: PathBuf,
}

impl Bins {
    /// `LAB_BIN_DIR`, else the directory of the running executable, else its parent (test
    /// executables live in `target/<profile>/deps`).
    pub fn locate() -> Result<Self> {
        if let Some(dir) = std::env::var_os("LAB_BIN_DIR") {
            return Ok(Self { dir: dir.into() });
        }
        let exe = std::env::current_exe().context("cannot find the running executable")?;
        let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if !dir.join("broker").exists() {
            if let Some(parent) = dir.parent() {
                if parent.join("broker").exists() {
                    dir = parent.to_path_buf();
                }
            }
        }
        Ok(Self { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Fails with a hint when a binary is missing.
    pub fn check(&self, names: &[&str]) -> Result<()> {
        for name in names {
            if !self.path(name).exists() {
                bail!(
                    "{} not found: build the workspace first (cargo build --workspace)",
                    self.path(name).display()
                );
            }
        }
        Ok(())
    }
}

/// When built by cargo, builds every role binary of the workspace with this crate's profile
/// (debug or release), so that nothing spawns a stale binary: `cargo run -p lab` and
/// `cargo test -p integration` build only their own package. Without cargo (an installed
/// binary), does nothing.
pub fn build_roles() -> Result<()> {
    let Some(cargo) = option_env!("CARGO") else {
        return Ok(());
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    if !root.join("Cargo.toml").exists() {
        return Ok(());
    }
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--quiet", "--workspace", "--bins"]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .context("cannot run cargo to build the role binaries")?;
    if !status.success() {
        bail!("building the role binaries failed");
    }
    Ok(())
}

/// A running child. Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    pid: i32,
    lines: watch::Receiver<Vec<String>>,
    log: PathBuf,
    /// Where this child's lines start in `log` (a log file may hold earlier runs).
    log_start: u64,
    exit: Option<ExitStatus>,
    /// Reads stdout into `lines`; ends at EOF.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Proc {
    /// Starts `program args...`, named `name` in logs; stderr goes to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log_dir: &Path) -> Result<Self> {
        Self::spawn_with(name, Command::new(program).args(args), log_dir)
    }

    /// Starts a prepared command (e.g. wrapped in `ip netns exec`).
    pub fn spawn_with(name: &str, command: &mut Command, log_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("cannot create {}", log_dir.display()))?;
        let log = log_dir.join(format!("{name}.log"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let log_start = stderr.metadata().map(|m| m.len()).unwrap_or(0);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child
            .id()
            .map(|p| p as i32)
            .ok_or_else(|| anyhow!("{name} exited at once"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{name}: no stdout"))?;
        let (tx, lines) = watch::channel(Vec::new());
        let reader = tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                tx.send_modify(|v| v.push(line));
            }
        });
        tape::record(Kind::Start, name, format!("{name} started (pid {pid})"));
        Ok(Self {
            name: name.to_string(),
            child,
            pid,
            lines,
            log,
            log_start,
            exit: None,
            reader: Some(reader),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Waits for the `ready k=v ...` line and returns its fields.
    pub async fn ready(&mut self, within: Duration) -> Result<BTreeMap<String, String>> {
        let fields = {
            let found = tokio::time::timeout(
                within,
                self.lines
                    .wait_for(|lines| lines.iter().any(|l| common::ready::parse(l).is_some())),
            )
            .await;
            match found {
                Ok(Ok(lines)) => lines.iter().find_map(|l| common::ready::parse(l)),
                _ => None,
            }
        };
        let fields = fields.ok_or_else(|| {
            anyhow!(
                "{} printed no ready line within {within:?}\n{}",
                self.name,
                self.log_tail()
            )
        })?;
        // The endpoints a server bound (what its peers need); the rest is in the log.
        let shown: Vec<String> = fields
            .iter()
            .filter(|(k, v)| v.starts_with("tcp://") && k.as_str() != "connect")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let text = match shown.is_empty() {
            true => format!("{} ready", self.name),
            false => format!("{} ready: {}", self.name, shown.join(" ")),
        };
        tape::record(Kind::Ready, &self.name, text);
        Ok(fields)
    }

    /// Lines printed on stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        self.lines.borrow().clone()
    }

    /// The last stdout line parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        let lines = self.stdout();
        let last = lines.last().ok_or_else(|| {
            anyhow!(
                "{} printed nothing on stdout\n{}",
                self.name,
                self.log_tail()
            )
        })?;
        serde_json::from_str(last).with_context(|| {
            format!(
                "{}: last stdout line is not the expected JSON: {last}",
                self.name
            )
        })
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        if self.exit.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid), signal)
            .with_context(|| format!("cannot signal {} (pid {})", self.name, self.pid))?;
        let name = &self.name;
        let (kind, text) = match signal {
            Signal::SIGKILL => (Kind::Kill, format!("{name} SIGKILLed")),
            Signal::SIGSTOP => (
                Kind::Stop,
                format!("{name} SIGSTOPped (hung, connections open)"),
            ),
            Signal::SIGCONT => (Kind::Resume, format!("{name} SIGCONTinued")),
            Signal::SIGTERM | Signal::SIGINT => {
                (Kind::Term, format!("{name} asked to finish ({signal})"))
            }
            other => (Kind::Note, format!("{name} sent {other}")),
        };
        tape::record(kind, name, text);
        Ok(())
    }

    /// Waits for the child to exit.
    pub async fn wait(&mut self, within: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .map_err(|_| {
                anyhow!(
                    "{} still running after {within:?}\n{}",
                    self.name,
                    self.log_tail()
                )
            })??;
        // The stdout reader ends at EOF, after the last line (a grandchild holding the pipe
        // open must not hang us: bounded).
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        self.exit = Some(status);
        // A kill was told when it was sent.
        use std::os::unix::process::ExitStatusExt;
        if status.signal() != Some(Signal::SIGKILL as i32) {
            tape::record(
                Kind::Exit,
                &self.name,
                match (status.code(), status.signal()) {
                    (Some(code), _) => format!("{} exited with status {code}", self.name),
                    (_, Some(signal)) => format!("{} ended by signal {signal}", self.name),
                    _ => format!("{} exited ({status})", self.name),
                },
            );
        }
        Ok(status)
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) -> Result<()> {
        self.signal(Signal::SIGKILL)?;
        self.wait(Duration::from_secs(10)).await.map(|_| ())
    }

    /// What this child wrote on stderr so far.
    pub fn log_text(&self) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        let start = (self.log_start as usize).min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// The last lines of the child's stderr log.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(30);
        format!(
            "--- {} stderr ({}) ---\n{}",
            self.name,
            self.log.display(),
            lines[start..].join("\n")
        )
    }
}
