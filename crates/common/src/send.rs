//! Sends that never wait on a peer.
//!
//! `zeromq` 0.7 gives each peer a queue of 100,000 messages and, once it is full, a `send()`
//! waits for room. Waiting is dangerous, not just slow: the pending send holds a lock on the
//! socket's peer map, and if that peer's connection fails meanwhile, the library's writer task
//! takes the same lock with a blocking call and parks the runtime thread for good (measured: a
//! broker that stopped answering anyone and ignored SIGTERM). So a role's loop sends through
//! [`try_send`]: the send is polled once, and if the peer's queue has no room the message is
//! dropped there and then, the lock released, and the caller told the peer is stalled.

use futures::FutureExt;
use zeromq::{SocketSend, ZmqError, ZmqMessage};

/// What became of one message.
#[derive(Debug)]
pub enum Sent {
    /// In the peer's queue.
    Queued,
    /// The peer's queue is full (it stopped reading): the message was dropped.
    Stalled,
    /// The library refused it: unknown or disconnected peer, or no peer at all.
    Failed(ZmqError),
}

impl Sent {
    pub fn is_queued(&self) -> bool {
        matches!(self, Self::Queued)
    }
}

/// Hands `msg` to the socket if its peer's queue has room now; never waits.
///
/// A ROUTER drops a message it cannot queue; a round-robin socket (PUSH, DEALER) also takes the
/// stalled peer out of its rotation, so later sends go to the others.
pub fn try_send<S: SocketSend>(socket: &mut S, msg: ZmqMessage) -> Sent {
    match socket.send(msg).now_or_never() {
        Some(Ok(())) => Sent::Queued,
        Some(Err(e)) => Sent::Failed(e),
        None => Sent::Stalled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;
    use zeromq::{DealerSocket, RouterSocket, Socket, SocketRecv};

    /// A peer that stops reading fills its queue; from then on every send returns at once as
    /// `Stalled`, and once the peer's connection dies the socket is still usable (the bug this
    /// module exists for parked the thread here).
    #[tokio::test(flavor = "current_thread")]
    async fn a_peer_that_stops_reading_never_blocks_the_sender() {
        let mut router = RouterSocket::new();
        let endpoint = router
            .bind("tcp://127.0.0.1:0")
            .await
            .expect("bind")
            .to_string();
        let mut dealer = DealerSocket::new();
        dealer.connect(&endpoint).await.expect("connect");
        dealer.send(ZmqMessage::from("hello")).await.expect("send");
        let hello = router.recv().await.expect("hello");
        let peer = hello.get(0).expect("identity").clone();
        let payload = Bytes::from(vec![0u8; 16 * 1024]);
        let mut stalled = 0;
        for _ in 0..200_000 {
            let mut msg = ZmqMessage::from(payload.clone());
            msg.push_front(peer.clone());
            if let Sent::Stalled = try_send(&mut router, msg) {
                stalled += 1;
                if stalled > 10 {
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
        assert!(stalled > 10, "the queue never filled");
        drop(dealer);
        // The writer notices the dead peer; the next sends fail at once instead of hanging.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut msg = ZmqMessage::from(payload.clone());
            msg.push_front(peer.clone());
            if let Sent::Failed(_) = try_send(&mut router, msg) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "peer never reported gone"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
