//! How a run ends, in two steps: on `drain` carousel stops taking connections and says
//! it is not ready, and lets the open ones finish; on `abandon` (a deadline, a second
//! signal) it cuts the ones still open.

use std::future::Future;

/// The two futures that end a run (`proxy::run`, `run::run_from_file`, ...).
pub struct Shutdown<D, A> {
    /// Resolves when the drain begins (SIGTERM, a test's stop).
    pub(crate) drain: D,
    /// Resolves when the drain is to be cut short.
    pub(crate) abandon: A,
}

impl<D: Future<Output = ()>, A: Future<Output = ()>> Shutdown<D, A> {
    pub fn new(drain: D, abandon: A) -> Self {
        Self { drain, abandon }
    }
}
