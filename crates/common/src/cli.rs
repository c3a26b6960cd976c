//! Command-line pieces shared by the connecting roles (flatten them into a clap `Parser`).

use std::time::Duration;

use clap::Args;

use crate::heartbeat::Heartbeat;
use crate::link::Reconnect;
use crate::wire::limits::Limits;

/// Heartbeat timing flags.
#[derive(Debug, Clone, Args)]
pub struct HeartbeatArgs {
    /// Milliseconds between heartbeats.
    #[arg(long, env = "HEARTBEAT_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    pub heartbeat_ms: u64,
    /// A peer silent for this many heartbeat intervals is taken for dead.
    #[arg(long, env = "LIVENESS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub liveness: u32,
}

impl HeartbeatArgs {
    pub fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            interval: Duration::from_millis(self.heartbeat_ms),
            liveness: self.liveness,
        }
    }
}

/// Reconnection flags.
#[derive(Debug, Clone, Args)]
pub struct ReconnectArgs {
    /// First pause in milliseconds before reconnecting; it doubles on each failure.
    #[arg(long, env = "RECONNECT_MIN_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub reconnect_min_ms: u64,
    /// Longest pause in milliseconds between reconnection attempts.
    #[arg(long, env = "RECONNECT_MAX_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub reconnect_max_ms: u64,
    /// Milliseconds one connection attempt (TCP and ZMTP handshake) may take.
    #[arg(long, env = "CONNECT_TIMEOUT_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    pub connect_timeout_ms: u64,
}

impl ReconnectArgs {
    pub fn reconnect(&self) -> Reconnect {
        Reconnect {
            min: Duration::from_millis(self.reconnect_min_ms),
            max: Duration::from_millis(self.reconnect_max_ms.max(self.reconnect_min_ms)),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
        }
    }
}

/// What one peer may send to a server, and make it hold.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest frame, and largest message, a peer may send.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(64..))]
    pub max_message_bytes: u64,
    /// Most frames in one message.
    #[arg(long, env = "MAX_FRAMES", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_frames: u32,
    /// Bytes sent to one peer and not yet read by it, at most; a peer that lets more pile up
    /// (it stopped reading) is cut off.
    #[arg(long, env = "MAX_PEER_BYTES", default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_peer_bytes: u64,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_message_bytes: self.max_message_bytes,
            max_frames: self.max_frames,
            max_peer_bytes: self.max_peer_bytes,
        }
    }
}

/// Parses the command line of a binary that flattens [`LimitArgs`], with defaults of its own for
/// `--max-message-bytes` and `--max-peer-bytes` (shown by `--help`); exits on bad flags as
/// clap does.
pub fn parse_with_guard_defaults<P: clap::Parser>(
    max_message_bytes: u64,
    max_peer_bytes: u64,
) -> P {
    // Once per process: clap (without its `string` feature) takes `'static` defaults.
    let text = |n: u64| -> &'static str { Box::leak(n.to_string().into_boxed_str()) };
    let command = P::command()
        .mut_arg("max_message_bytes", |a| {
            a.default_value(text(max_message_bytes))
        })
        .mut_arg("max_peer_bytes", |a| a.default_value(text(max_peer_bytes)));
    let mut matches = command.get_matches();
    P::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.exit())
}

/// The end of every binary's `main`: an error becomes one `error: ...` line on stderr (with its
/// causes, for `anyhow` errors) and exit status 1.
pub fn exit_code<E: std::fmt::Display>(
    result: Result<std::process::ExitCode, E>,
) -> std::process::ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        std::process::ExitCode::FAILURE
    })
}

/// A clap value parser for a number that must be positive and finite (a rate).
pub fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err("must be a positive number".into()),
    }
}

/// A clap value parser for a positive number of seconds, fractions allowed (`--duration-s`).
pub fn positive_secs(s: &str) -> Result<Duration, String> {
    positive(s)
        .map(Duration::from_secs_f64)
        .map_err(|_| "must be a positive number of seconds".into())
}
