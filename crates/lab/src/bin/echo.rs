//! `echo`: a bare ROUTER that sends every message straight back. The benchmark's direct
//! DEALER<->ROUTER baseline: the same client, one hop, no broker.

use clap::Parser;
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend};

/// Bare ROUTER echo server (benchmark baseline).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Endpoint to bind.
    #[arg(long, default_value = "tcp://127.0.0.1:0", value_parser = common::endpoint::parse_tcp)]
    bind: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::logging::init("echo=info");
    let shutdown = common::shutdown::on_signals();
    let mut router = RouterSocket::new();
    let endpoint = router.bind(&args.bind).await?;
    common::ready::announce(&[("endpoint", &endpoint.to_string())]);
    loop {
        let msg = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            m = router.recv() => m,
        };
        if let Ok(msg) = msg {
            let _ = router.send(msg).await;
        }
    }
}
