//! Logging setup for binaries: human-readable events on stderr, filtered by `RUST_LOG`.
//!
//! stdout is reserved for the `ready` line and JSON summaries that scripts parse.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `default_filter` (e.g. `"broker=info,common=info"`) applies
/// when `RUST_LOG` is unset. zmq.rs logs through `log`; the `tracing-log` bridge carries it.
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
