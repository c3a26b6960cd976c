//! Divide and conquer (zguide `taskvent`/`taskwork2`/`tasksink`): a master deals image tasks
//! over PUSH to workers that PULL them, and collects their reports over PULL.
//!
//! ```text
//!            PUSH tasks ──────────► PULL ┐
//!  master    PULL reports ◄──────── PUSH ├ pipeline-worker (any number, any host)
//!            PUB control ─────────► SUB  ┘
//! ```
//!
//! - [`master`]: the batch's books, credit flow, re-sends, summary.
//! - [`worker`]: the worker loop and [`worker::execute`], the per-image work.
//! - [`protocol`]: typed messages <-> frames. [`filter`]: filter chains. [`files`]: listing and
//!   atomic writes. [`job`]: a job's record in its output, to resume it after a lost master.
//!   [`sample`]: the built-in sample images.

pub mod files;
pub mod filter;
pub mod job;
pub mod master;
pub mod protocol;
pub mod sample;
pub mod worker;

pub use master::{Endpoints, MasterConfig, Summary, Transfer};
pub use worker::{WorkerConfig, WorkerExit};
