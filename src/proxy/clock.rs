//! The proxy's millisecond clock: one number that fits an atomic, for what the data path
//! stamps on every connection (an ejection's end, a connection's last activity).

use std::sync::OnceLock;

use tokio::time::Instant;

/// Time on the proxy's clock (tokio's, so that tests can pause it), in milliseconds.
pub(crate) fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// `at` on the same millisecond clock as [`now_ms`].
pub(crate) fn ms_at(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| at);
    at.saturating_duration_since(epoch).as_millis() as u64
}
