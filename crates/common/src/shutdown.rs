//! Ctrl-C and SIGTERM cancel one token that every loop `select!`s on.

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Returns a token cancelled on the first SIGINT or SIGTERM. Must be called inside a runtime.
///
/// The handlers are installed before this returns (not in the spawned task), so a signal sent
/// right after a process printed its `ready` line is never met by the default action (death).
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    let int = watch(SignalKind::interrupt());
    let term = watch(SignalKind::terminate());
    tokio::spawn(async move {
        tokio::select! {
            () = next(int) => {}
            () = next(term) => {}
        }
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}

fn watch(kind: SignalKind) -> Option<Signal> {
    signal(kind)
        .map_err(|e| tracing::warn!(error = %e, ?kind, "cannot watch signal"))
        .ok()
}

async fn next(signal: Option<Signal>) {
    match signal {
        Some(mut s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
