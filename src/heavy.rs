//! Heavy synchronous work inside async code. At cluster scale a state file parse, a
//! relist's flush or a full route build takes a good part of a second; run on a runtime
//! worker as is, it would stall the connections queued behind it on that worker.

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs `f` without stalling the runtime: on a multi-threaded runtime this worker first
/// hands its queued tasks to the others (`block_in_place`). A current-thread runtime
/// (unit tests) has no other worker to hand them to, and runs `f` as is.
pub(crate) fn run<R>(f: impl FnOnce() -> R) -> R {
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
