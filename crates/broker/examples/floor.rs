//! The least a load-balancing broker on `zeromq` 0.7 can do, to measure the library's floor:
//! no heartbeats, no purge, no bounds, no retry merging, no stats. It forwards requests to
//! workers that said READY (RFC 6 `\x01`, one credit each) and replies back, in one task, draining
//! each socket like the real broker. Speed comparisons only (docs/performance.md):
//!
//!     cargo run --release -p broker --example floor -- tcp://127.0.0.1:5559 tcp://127.0.0.1:5560

use std::collections::VecDeque;

use bytes::Bytes;
use futures::FutureExt;
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(front), Some(back)) = (args.next(), args.next()) else {
        return Err("usage: floor FRONTEND BACKEND".into());
    };
    let mut frontend = RouterSocket::new();
    frontend.bind(&front).await?;
    let mut backend = RouterSocket::new();
    backend.bind(&back).await?;
    let mut idle: VecDeque<Bytes> = VecDeque::new();
    let mut queue: VecDeque<ZmqMessage> = VecDeque::new();
    loop {
        tokio::select! {
            msg = frontend.recv() => {
                let mut next = Some(msg);
                while let Some(msg) = next {
                    queue.push_back(msg?);
                    next = frontend.recv().now_or_never();
                }
            }
            msg = backend.recv() => {
                let mut next = Some(msg);
                while let Some(msg) = next {
                    let mut frames = msg?.into_vecdeque();
                    let worker = frames.pop_front().unwrap_or_default();
                    if frames.len() == 1 {
                        if frames[0].as_ref() == b"\x01" {
                            idle.push_back(worker);
                        }
                    } else {
                        idle.push_back(worker);
                        if let Ok(reply) = ZmqMessage::try_from(frames) {
                            let _ = frontend.send(reply).now_or_never();
                        }
                    }
                    next = backend.recv().now_or_never();
                }
            }
        }
        while !queue.is_empty() && !idle.is_empty() {
            let (Some(request), Some(worker)) = (queue.pop_front(), idle.pop_front()) else {
                break;
            };
            let mut msg = request;
            msg.push_front(worker);
            let _ = backend.send(msg).now_or_never();
        }
        tokio::task::yield_now().await;
    }
}
