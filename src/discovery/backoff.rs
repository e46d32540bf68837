//! Pacing a watcher when the API server is away: client-go's reflector backoff (0.8 s
//! doubling to 30 s, jittered), reset only by a completed list, and one log line per
//! outage of all the watches together, not one per attempt.
//!
//! kube-runtime's own `StreamBackoff` resets on every `Ok` item, and its watcher yields
//! `Ok(Event::Init)` before each relist, so a dead API server was retried about once a
//! second for ever.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::stream::{self, BoxStream, Stream, StreamExt};
use kube::runtime::watcher::{self, Event};

pub use crate::backoff::{Backoff, INITIAL, MAX};

/// The watches of one API server, as the log tells of them: the first watch that fails
/// says so at warn, with the server; the others, and every further attempt, at debug;
/// the last one to list again says it is back, at info.
#[derive(Debug)]
pub(crate) struct Outage {
    server: String,
    failing: AtomicUsize,
}

impl Outage {
    pub(crate) fn new(server: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            server: server.into(),
            failing: AtomicUsize::new(0),
        })
    }

    fn failed(&self, kind: &str, error: &watcher::Error) {
        if self.failing.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                server = %self.server,
                kind,
                error = %causes(error),
                "cannot reach the Kubernetes API; serving the last table, retrying with backoff (0.8 s doubling to 30 s)"
            );
        } else {
            tracing::debug!(kind, %error, "another watch failed");
        }
    }

    /// One watch's streak is over; `listed` when it ended in a completed list (not in
    /// the watch being dropped).
    fn ended(&self, kind: &str, attempts: u64, listed: bool) {
        if self.failing.fetch_sub(1, Ordering::Relaxed) == 1 && listed {
            tracing::info!(server = %self.server, kind, failed_attempts = attempts, "the Kubernetes API is back");
        }
    }
}

/// An error and its sources, "a: b: c", skipping a source whose text its parent already
/// ends with: kube's errors name what failed, their sources why (a DNS name, a refusal).
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// One watch's failed attempts in a row, counted in its `Outage` while there are any.
struct Streak {
    kind: &'static str,
    outage: Arc<Outage>,
    failures: u64,
}

impl Streak {
    fn failed(&mut self, error: &watcher::Error) {
        if self.failures == 0 {
            self.outage.failed(self.kind, error);
        } else {
            tracing::debug!(kind = self.kind, %error, attempt = self.failures + 1, "watch still failing");
        }
        self.failures += 1;
    }

    fn listed(&mut self) {
        if self.failures > 0 {
            self.outage.ended(self.kind, self.failures, true);
            self.failures = 0;
        }
    }
}

impl Drop for Streak {
    // A watch stopped while failing (the pod watch, when no Service weighs pods any
    // more) leaves the outage to the others.
    fn drop(&mut self) {
        if self.failures > 0 {
            self.outage.ended(self.kind, self.failures, false);
        }
    }
}

/// The events of `events` with its errors taken out: after an error the next attempt
/// waits for `Backoff::next_pause`, and a completed list (`InitDone`) resets the pause.
/// Errors are logged through `outage`.
pub(crate) fn paced<K: Send + 'static>(
    kind: &'static str,
    events: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    backoff: Backoff,
    outage: Arc<Outage>,
) -> BoxStream<'static, Event<K>> {
    let streak = Streak {
        kind,
        outage,
        failures: 0,
    };
    stream::unfold(
        (events.boxed(), backoff, streak),
        |(mut events, mut backoff, mut streak)| async move {
            loop {
                match events.next().await? {
                    Ok(event) => {
                        if matches!(event, Event::InitDone) {
                            backoff.reset();
                            streak.listed();
                        }
                        return Some((event, (events, backoff, streak)));
                    }
                    Err(error) => {
                        streak.failed(&error);
                        tokio::time::sleep(backoff.next_pause()).await;
                    }
                }
            }
        },
    )
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A stream of errors and list completions, paced on paused time: the pauses grow
    /// while errors follow errors (an `Init` between them does not reset them), and a
    /// completed list starts over.
    #[tokio::test(start_paused = true)]
    async fn only_a_completed_list_resets_the_pause() {
        let failure = || Err(watcher::Error::NoResourceVersion);
        let items: Vec<Result<Event<()>, watcher::Error>> = vec![
            Ok(Event::Init),
            failure(),
            Ok(Event::Init),
            failure(),
            Ok(Event::Init),
            failure(),
            Ok(Event::Init),
            Ok(Event::InitDone),
            failure(),
            Ok(Event::Init),
        ];
        let start = tokio::time::Instant::now();
        let mut times = Vec::new();
        let mut paced = paced(
            "Test",
            stream::iter(items),
            Backoff::seeded(5),
            Outage::new("http://test"),
        );
        while let Some(event) = paced.next().await {
            if matches!(event, Event::Init) {
                times.push(start.elapsed());
            }
        }
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        // Windows 0.8, 1.6, 3.2 s for the first three failures, 0.8 s after the reset.
        assert!(gaps[0] >= Duration::from_millis(400) && gaps[0] < INITIAL);
        assert!(gaps[1] >= INITIAL && gaps[1] < INITIAL * 2);
        assert!(gaps[2] >= INITIAL * 2 && gaps[2] < INITIAL * 4);
        assert!(gaps[3] < INITIAL, "a completed list resets: {gaps:?}");
    }
}
