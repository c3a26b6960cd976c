//! What one peer may send to a socket of ours and make it hold, and the counters of what each
//! socket refused. Every bound socket of every role is ours ([`super::server`]), and checks
//! these on every endpoint, loopback included. (They were the guard relay's, `common::guard`,
//! while the roles served on zmq.rs's sockets behind it; the counters keep its names in the
//! roles' stats: `guard_refused`, `guard_stalled`.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What one peer may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, and largest sum of the frames of one message (commands included).
    pub max_message_bytes: u64,
    /// Most frames in one message (bounds a flood of empty frames with MORE set).
    pub max_frames: u32,
    /// Most bytes waiting for the peer to read; beyond, the peer is cut off as stalled (or, on
    /// a socket for peers that may never send, what does not fit is dropped).
    pub max_peer_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1 << 20,
            max_frames: 1024,
            max_peer_bytes: 16 << 20,
        }
    }
}

/// Counters of one socket.
#[derive(Debug, Default)]
pub struct GuardStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections cut off for breaking the limits or not speaking ZMTP 3 (garbage, a greeting
    /// cut short or not finished in time).
    pub refused: AtomicU64,
    /// Connections cut off because their peer stopped reading (more than `max_peer_bytes`
    /// waiting, or writes stalled while its kernel still acknowledges).
    pub stalled: AtomicU64,
    /// Quiet connections closed to make room for a new one at the connection bound.
    pub evicted: AtomicU64,
    /// New connections closed at once at the connection bound, every open one having been heard
    /// from lately.
    pub turned_away: AtomicU64,
    /// Connections whose peer could not be reached while writes waited, kept for when the link
    /// heals (sockets for peers that may never send only).
    pub unreachable: AtomicU64,
}

impl GuardStats {
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn stalled(&self) -> u64 {
        self.stalled.load(Ordering::Relaxed)
    }

    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    pub fn unreachable(&self) -> u64 {
        self.unreachable.load(Ordering::Relaxed)
    }

    pub fn turned_away(&self) -> u64 {
        self.turned_away.load(Ordering::Relaxed)
    }
}

/// The sum of `refused` and of `stalled` over several sockets.
pub fn totals<'a>(sockets: impl IntoIterator<Item = &'a Arc<GuardStats>>) -> (u64, u64) {
    sockets
        .into_iter()
        .fold((0, 0), |(r, s), g| (r + g.refused(), s + g.stalled()))
}
