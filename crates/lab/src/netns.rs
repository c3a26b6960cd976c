//! Test hosts in network namespaces, for real partitions (needs root and `ip` from iproute2).
//!
//! One namespace is joined to the host by a veth pair on a private /24 of its own; roles run
//! inside it with `ip netns exec`. A partition takes the namespace side of the link down (taking
//! the host side down would let connects leak to the default route); healing brings it up.
//! Everything is removed on drop.

use std::process::Stdio;

use anyhow::{bail, Context, Result};
use tokio::process::Command;

/// A namespace and its link to the host.
#[derive(Debug)]
pub struct TestHost {
    pub name: String,
    /// The host side address: servers the test host must reach bind here.
    pub host_ip: String,
    /// The test host's own address.
    pub ip: String,
    inner_if: String,
}

async fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("cannot run ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// True when this process may create namespaces (root and a working `ip netns`).
pub async fn available() -> bool {
    if !nix::unistd::geteuid().is_root() {
        return false;
    }
    let probe = format!("zqprobe{}", std::process::id());
    if ip(&["netns", "add", &probe]).await.is_err() {
        return false;
    }
    ip(&["netns", "del", &probe]).await.is_ok()
}

impl TestHost {
    /// Creates namespace number `n` of this process (`n` < 64 keeps names and subnets apart).
    pub async fn create(n: u32) -> Result<Self> {
        let pid = std::process::id();
        let name = format!("zq{pid}n{n}");
        // A subnet per (process, host): 10.<200+n%50>.<pid%250>.0/24.
        let net = format!("10.{}.{}", 200 + n % 50, pid % 250);
        let host_if = format!("zqh{}{n}", pid % 100_000);
        let inner_if = format!("zqi{}{n}", pid % 100_000);
        let host = Self {
            name: name.clone(),
            host_ip: format!("{net}.1"),
            ip: format!("{net}.2"),
            inner_if: inner_if.clone(),
        };
        ip(&["netns", "add", &name]).await?;
        // From here on, Drop cleans up whatever was made.
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &inner_if,
        ])
        .await?;
        ip(&["link", "set", &inner_if, "netns", &name]).await?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", host.host_ip),
            "dev",
            &host_if,
        ])
        .await?;
        ip(&["link", "set", &host_if, "up"]).await?;
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{}/24", host.ip),
            "dev",
            &inner_if,
        ])
        .await?;
        ip(&["-n", &name, "link", "set", &inner_if, "up"]).await?;
        ip(&["-n", &name, "link", "set", "lo", "up"]).await?;
        Ok(host)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Takes the namespace side of the link down (a partition) or back up (healed).
    pub async fn set_partitioned(&self, partitioned: bool) -> Result<()> {
        let state = if partitioned { "down" } else { "up" };
        ip(&["-n", &self.name, "link", "set", &self.inner_if, state]).await?;
        let label = format!("link to test host {} ({})", self.name, self.ip);
        match partitioned {
            true => crate::tape::record(
                crate::tape::Kind::Cut,
                &label,
                format!("{label} taken down"),
            ),
            false => {
                crate::tape::record(crate::tape::Kind::Heal, &label, format!("{label} up again"))
            }
        }
        Ok(())
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}
