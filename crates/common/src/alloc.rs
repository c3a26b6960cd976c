//! The servers' allocator: mimalloc, tuned to give memory back.
//!
//! Every message a server reads on our own sockets is copied into an allocation of its own
//! (`wire`: so that what it keeps holds only its own bytes), and on glibc's malloc that was a
//! tenth of the broker's instructions. mimalloc makes it cheaper than the code before the copies
//! (callgrind, the broker between libzmq's client and worker at 64 in flight: 5.49k
//! instructions per request before, 5.87k with the copies on glibc, 5.34k on mimalloc). Out of
//! the box it backs its arenas with transparent huge pages and keeps what it frees for a second,
//! which cost RSS the byte bounds do not account for (the idle broker 9.9 MB instead of 4.0; a
//! peak of +26 MiB instead of +8 under `tests/peer_bytes`). So it is built without huge pages
//! (the crate's `no_thp` feature: the idle broker 4.5 MB) and [`tune`] gives freed memory back
//! at once; the instructions per request stay the same.
//!
//! A binary opts in with (this example runs as a test: it also checks, in a debug build, that
//! the option [`tune`] sets is where mimalloc has it)
//!
//! ```
//! #[global_allocator]
//! static ALLOCATOR: common::alloc::MiMalloc = common::alloc::MiMalloc;
//!
//! fn main() {
//!     common::alloc::tune(); // first thing
//! }
//! ```

pub use mimalloc::MiMalloc;

use libmimalloc_sys::mi_option_t;

/// An option of mimalloc's (mimalloc.h, v3, the version the `mimalloc` crate builds), by its
/// index, with its default: the debug builds check the default, so that an update of mimalloc
/// that moves an option fails the tests rather than setting another.
struct MiOption {
    index: mi_option_t,
    default: std::ffi::c_long,
}

/// How long freed memory stays with the process before it goes back to the system (ms).
const PURGE_DELAY: MiOption = MiOption {
    index: 15,
    default: 1000,
};

/// Freed memory goes back to the system at once: the RSS follows what the process holds. A
/// no-op unless mimalloc is the global allocator.
#[allow(unsafe_code)] // mimalloc has no safe setter for its options
pub fn tune() {
    for (option, value) in [(PURGE_DELAY, 0)] {
        // SAFETY: plain calls into mimalloc that read and write one of its options.
        unsafe {
            debug_assert_eq!(
                libmimalloc_sys::mi_option_get(option.index),
                option.default,
                "mimalloc option {} moved",
                option.index
            );
            libmimalloc_sys::mi_option_set(option.index, value);
        }
    }
}
