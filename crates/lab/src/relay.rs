//! A fault-injecting TCP relay on loopback, for partitions where network namespaces are not
//! available (no root). While partitioned it blackholes every connection through it, both ways,
//! and holds new ones without reaching upstream: bytes stay queued, connections stay open, as
//! when a cable is pulled. Healed, everything flows again.
//!
//! Why not `noxious` (the Rust port of Toxiproxy on the registry): its blackhole, the `timeout`
//! toxic, reads and discards the bytes. After healing, the ZMTP stream resumes mid-frame with
//! bytes missing, which no real partition does (TCP retransmits what was in flight). Holding
//! the bytes is what this relay adds, in about a hundred lines.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A running relay; stops when dropped.
#[derive(Debug)]
pub struct Relay {
    /// Where peers connect instead of the upstream.
    pub listen: SocketAddr,
    partitioned: watch::Sender<bool>,
    stop: CancellationToken,
    /// What the narration calls this link.
    label: String,
}

impl Relay {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("relay cannot bind")?;
        let listen = listener.local_addr()?;
        let (partitioned, watch) = watch::channel(false);
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = token.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((inbound, _)) = accepted else { continue };
                let watch = watch.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = token.cancelled() => {}
                        () = connection(inbound, upstream, watch) => {}
                    }
                });
            }
        });
        Ok(Self {
            listen,
            partitioned,
            stop,
            label: format!("link to {upstream}"),
        })
    }

    /// Names the link in the narration (`frontend link cut`).
    pub fn labelled(mut self, label: &str) -> Self {
        self.label = format!("{label} link");
        self
    }

    pub fn endpoint(&self) -> String {
        format!("tcp://{}", self.listen)
    }

    /// Blackholes every connection (`true`) or lets bytes flow again (`false`).
    pub fn set_partitioned(&self, partitioned: bool) {
        if self.partitioned.send_replace(partitioned) == partitioned {
            return;
        }
        let label = &self.label;
        match partitioned {
            true => crate::tape::record(
                crate::tape::Kind::Cut,
                label,
                format!("{label} cut (relay holds every byte)"),
            ),
            false => crate::tape::record(crate::tape::Kind::Heal, label, format!("{label} healed")),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn open(watch: &mut watch::Receiver<bool>) {
    let _ = watch.wait_for(|partitioned| !partitioned).await;
}

async fn connection(inbound: TcpStream, upstream: SocketAddr, mut watch: watch::Receiver<bool>) {
    open(&mut watch).await;
    let Ok(outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let up = pipe(in_read, out_write, watch.clone());
    let down = pipe(out_read, in_write, watch);
    tokio::join!(up, down);
}

/// Copies one direction, pausing (holding bytes, reading nothing) while partitioned.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut watch: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        open(&mut watch).await;
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
            _ = watch.wait_for(|partitioned| *partitioned) => continue,
        };
        // Bytes read just before a partition are held until it heals.
        open(&mut watch).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    open(&mut watch).await;
    let _ = to.shutdown().await;
}
