//! Watching the state file: a look at its metadata every 150 ms, the bytes read only
//! when it changed, and each good version, once settled, published as a new table.
//! Refused versions, a missing file and bad annotations are logged once each and
//! counted; the last good table stays in force.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::discovery::convert::{Scope, Warning};
use crate::discovery::file::{
    digest, ignored_kind_note, parse, read, utf8, Loaded, Stamp, StateFileError, MAX_UNKNOWN_FIELDS,
};
use crate::discovery::table_changes::TableChanges;
use crate::model::ServiceTable;
use crate::telemetry::Telemetry;

/// How often the file is looked at.
const POLL_INTERVAL: Duration = Duration::from_millis(150);
/// How long a version written in place must stay the same before it is applied, so that
/// a file written in pieces (`kubectl get -o yaml > state.yaml`) is not taken for a new
/// state at each piece. A file renamed into place is applied without it; a writer that
/// pauses longer, or changes the file more often, should write elsewhere and rename.
pub(crate) const SETTLE: Duration = Duration::from_secs(1);

/// How long after its last change a file's metadata is trusted to tell a change.
const SETTLED: Duration = Duration::from_secs(1);

/// When all of a look's metadata is as at the last look, and the last change is older
/// than `SETTLED`, the bytes are not read again.
impl Stamp {
    /// Which file this is: another one after a rename into place.
    pub(super) fn file(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Whether the file changed so recently that a second write could still hide behind
    /// the same metadata (file times tick in milliseconds, not per write).
    pub(super) fn is_fresh(&self, now: SystemTime) -> bool {
        self.modified
            .and_then(|m| now.duration_since(m).ok())
            .is_none_or(|age| age < SETTLED)
    }
}

/// Watches the state file and publishes every good version on `tables`.
///
/// Each look reads the file's metadata; the bytes are read only when it changed (or
/// changed within the last second), off the runtime's threads. A version is applied
/// once its bytes have stayed the same for `SETTLE`, so that a file caught half-written
/// is not taken for a new state, or after two looks when it was renamed into place (a
/// file of another inode); a file that is empty, not a regular file, or over
/// `MAX_BYTES` is refused.
/// Refused versions, a missing file and bad annotations are logged once each and
/// counted in `carousel_config_errors_total`; the last good table stays in force.
pub(crate) async fn watch(
    path: PathBuf,
    scope: Scope,
    tables: watch::Sender<Arc<ServiceTable>>,
    telemetry: Arc<Telemetry>,
    initial: Loaded,
) {
    let mut reporter = Reporter::default();
    reporter.report_loaded(&initial, &telemetry);
    let mut versions = Versions::new(initial.version);
    drop(initial.table);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if tables.is_closed() {
            return;
        }
        let (stamp, bytes) = match versions.look(&path).await {
            Ok(Some(read)) => read,
            Ok(None) => continue,
            Err(error) => {
                reporter.refused(&error.to_string(), &telemetry);
                versions.lost();
                continue;
            }
        };
        if !versions.settled(stamp, &bytes) {
            continue;
        }
        match crate::heavy::run(|| parse(utf8(&path, &bytes)?, &scope)) {
            Ok(loaded) => {
                reporter.report_loaded(&loaded, &telemetry);
                let changes = TableChanges::between(&tables.borrow(), &loaded.table);
                let programming = telemetry.programming();
                programming.received(changes.services() as u64, 0);
                let sent = programming.publish(Vec::new(), || {
                    tables.send_if_modified(|current| {
                        let changed = **current != loaded.table;
                        if changed {
                            *current = Arc::new(loaded.table);
                        }
                        changed
                    })
                });
                // One line a reload, saying what it changed; a rewrite that changes
                // nothing (or only the node's part) is not news.
                if changes.is_empty() {
                    tracing::debug!(path = %path.display(), changed_table = sent, "state file read again: no Service changed");
                } else {
                    tracing::info!(path = %path.display(), "state file reloaded: {changes}");
                }
            }
            Err(error) => reporter.refused(&error.to_string(), &telemetry),
        }
    }
}

/// What the watch knows of the file's versions: the last one seen, the one applied, and
/// the one settling.
struct Versions {
    /// The metadata and digest of the last version read.
    last_seen: Option<(Stamp, u64)>,
    /// The digest of the version applied.
    applied: Option<u64>,
    /// The file (device and inode) the applied version was read from.
    applied_file: Option<(u64, u64)>,
    /// The digest of the version being looked at, and since when it has been so.
    settling: Option<(u64, Instant)>,
}

impl Versions {
    /// What `load` read counts as applied. Without it (a table parsed elsewhere), the
    /// first stable look parses the file, and publishes only if the table differs.
    fn new(loaded: Option<(Stamp, u64)>) -> Self {
        Self {
            applied: loaded.as_ref().map(|(_, digest)| *digest),
            applied_file: loaded.as_ref().map(|(stamp, _)| stamp.file()),
            last_seen: loaded,
            settling: None,
        }
    }

    /// The file's metadata, then its bytes, unless the metadata says they are the ones
    /// applied (`None`). The bytes are read off the runtime's threads.
    async fn look(&self, path: &PathBuf) -> Result<Option<(Stamp, Vec<u8>)>, StateFileError> {
        let io = |source| StateFileError::Read {
            path: path.clone(),
            source,
        };
        let stamp = Stamp::of(&tokio::fs::metadata(path).await.map_err(io)?);
        let unchanged = self.last_seen.as_ref().is_some_and(|(last, digest)| {
            *last == stamp && !stamp.is_fresh(SystemTime::now()) && Some(*digest) == self.applied
        });
        if unchanged {
            return Ok(None);
        }
        let at = path.clone();
        match tokio::task::spawn_blocking(move || read(&at)).await {
            Ok(read) => read.map(Some),
            Err(e) => Err(io(std::io::Error::other(e))),
        }
    }

    /// The file could not be read: whatever comes next is looked at afresh.
    fn lost(&mut self) {
        self.last_seen = None;
        self.settling = None;
    }

    /// Files what a look read; true when it is a new version to apply now. A version is
    /// applied once it has stayed the same for `SETTLE`; a file renamed into place
    /// (another inode) was complete when it arrived, and needs two looks.
    fn settled(&mut self, stamp: Stamp, bytes: &[u8]) -> bool {
        let seen = digest(bytes);
        let since = match self.settling {
            Some((digest, since)) if digest == seen => since,
            _ => self.settling.insert((seen, Instant::now())).1,
        }
        .elapsed();
        let file = stamp.file();
        let settle = match self.applied_file != Some(file) {
            true => POLL_INTERVAL,
            false => SETTLE,
        };
        self.last_seen = Some((stamp, seen));
        if since < settle || self.applied == Some(seen) {
            return false;
        }
        self.applied_file = Some(file);
        self.applied = Some(seen);
        true
    }
}

/// The most new warnings one version of the file logs line by line; the rest are
/// counted in one line. Each is counted in `carousel_config_errors_total` either way.
const MAX_WARNINGS_LOGGED: usize = 20;

/// The most ignored kinds one version of the file logs line by line.
const MAX_KINDS_LOGGED: usize = 20;

/// Logs and counts each distinct problem once, not on every look at the file.
#[derive(Default)]
struct Reporter {
    warnings: BTreeSet<Warning>,
    /// The unknown fields of the last version past those kept as warnings.
    more_unknown_fields: usize,
    refusal: Option<String>,
}

impl Reporter {
    fn report_loaded(&mut self, loaded: &Loaded, telemetry: &Telemetry) {
        self.refusal = None;
        let current: BTreeSet<Warning> = loaded.warnings.iter().cloned().collect();
        let new: Vec<&Warning> = current.difference(&self.warnings).collect();
        for w in new.iter().take(MAX_WARNINGS_LOGGED) {
            tracing::warn!("{w}");
        }
        if let Some(more) = new
            .len()
            .checked_sub(MAX_WARNINGS_LOGGED)
            .filter(|n| *n > 0)
        {
            tracing::warn!(
                more,
                "more new warnings in this version of the state file, not logged one by one"
            );
        }
        // Only the unknown fields kept as warnings count in the metric: the rest are not
        // known one by one, and one is enough to alert on.
        let errors = new.iter().filter(|w| w.is_config_error()).count();
        telemetry.config_errors().increment(errors as u64);
        self.warnings = current;
        let more = loaded.more_unknown_fields;
        if more > 0 && more != self.more_unknown_fields {
            tracing::warn!(
                "{more} more unknown fields in this version of the state file, past the \
                 first {MAX_UNKNOWN_FIELDS}, not logged one by one"
            );
        }
        self.more_unknown_fields = more;
        for kind in loaded.ignored_kinds.iter().take(MAX_KINDS_LOGGED) {
            tracing::warn!("{}", ignored_kind_note(kind));
        }
        if let Some(more) = loaded
            .ignored_kinds
            .len()
            .checked_sub(MAX_KINDS_LOGGED)
            .filter(|n| *n > 0)
        {
            tracing::warn!(more, "more kinds of objects ignored, not logged one by one");
        }
    }

    fn refused(&mut self, message: &str, telemetry: &Telemetry) {
        if self.refusal.as_deref() != Some(message) {
            tracing::error!("state file refused, keeping the last good state: {message}");
            telemetry.config_errors().increment(1);
            self.refusal = Some(message.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::file::tests::{endpoints, parse_ok, service_doc, slice_doc};
    use crate::discovery::file::{load, MAX_BYTES};
    use std::path::Path;

    #[test]
    fn metadata_is_trusted_only_once_the_file_has_settled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, "a").unwrap();
        let stamp = Stamp::of(&std::fs::metadata(&path).unwrap());
        let written = stamp.modified.unwrap();
        assert!(stamp.is_fresh(written + Duration::from_millis(500)));
        assert!(!stamp.is_fresh(written + SETTLED));
        std::fs::write(&path, "bb").unwrap();
        assert_ne!(Stamp::of(&std::fs::metadata(&path).unwrap()), stamp);
    }

    const WAIT: Duration = Duration::from_secs(5);

    fn table_of(text: &str) -> ServiceTable {
        parse_ok(text).table
    }

    fn state(addresses: &[&str]) -> String {
        format!(
            "{}---\n{}",
            service_doc("web", "10.96.0.10"),
            slice_doc("web", "web-1", addresses)
        )
    }

    /// Waits until the channel publishes a new table.
    async fn next_table(updates: &mut watch::Receiver<Arc<ServiceTable>>) -> Arc<ServiceTable> {
        tokio::time::timeout(WAIT, updates.changed())
            .await
            .expect("no new table within the wait")
            .expect("watcher gone");
        updates.borrow_and_update().clone()
    }

    /// Waits until the metrics show `line`; the watcher polls, so there is no event to await.
    async fn wait_for_metric(telemetry: &Telemetry, line: &str) {
        let seen = tokio::time::timeout(WAIT, async {
            while !telemetry.render().lines().any(|l| l == line) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(seen.is_ok(), "no {line:?} in:\n{}", telemetry.render());
    }

    /// A watcher of a state file of its own, loaded with `text` first.
    struct Watching {
        _dir: tempfile::TempDir,
        path: PathBuf,
        updates: watch::Receiver<Arc<ServiceTable>>,
        telemetry: Arc<Telemetry>,
        watcher: tokio::task::JoinHandle<()>,
    }

    fn start_watching(text: &str) -> Watching {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, text).unwrap();
        let initial = load(&path, &Scope::default()).unwrap();
        let (tables, mut updates) = watch::channel(Arc::new(initial.table.clone()));
        updates.borrow_and_update();
        let telemetry = Telemetry::new();
        let watcher = tokio::spawn(watch(
            path.clone(),
            Scope::default(),
            tables,
            telemetry.clone(),
            initial,
        ));
        Watching {
            _dir: dir,
            path,
            updates,
            telemetry,
            watcher,
        }
    }

    #[tokio::test]
    async fn watch_applies_good_versions_and_keeps_the_last_good_one() {
        let first = state(&["10.1.0.1"]);
        let Watching {
            _dir,
            path,
            mut updates,
            telemetry,
            watcher,
        } = start_watching(&first);

        // Give the watcher time to settle on the first version (not an assertion: the
        // test passes whichever version it sees first).
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        assert!(
            !updates.has_changed().unwrap(),
            "an unchanged table is not republished"
        );
        let second = state(&["10.1.0.1", "10.1.0.2"]);
        std::fs::write(&path, &second).unwrap();
        let table = next_table(&mut updates).await;
        assert_eq!(*table, table_of(&second));
        assert_eq!(endpoints(&table, "web"), ["10.1.0.1:8080", "10.1.0.2:8080"]);
        wait_for_metric(&telemetry, "carousel_config_errors_total 0").await;

        // A refused version: counted once, the table stays.
        std::fs::write(&path, second.replace("port: 8080", "port: eighty")).unwrap();
        wait_for_metric(&telemetry, "carousel_config_errors_total 1").await;
        assert_eq!(**updates.borrow(), table_of(&second));
        assert!(!updates.has_changed().unwrap());

        // A missing file: the table still stays.
        std::fs::remove_file(&path).unwrap();
        wait_for_metric(&telemetry, "carousel_config_errors_total 2").await;
        assert_eq!(**updates.borrow(), table_of(&second));
        assert!(!updates.has_changed().unwrap());

        // Bytes that are not UTF-8 (here in a comment) are refused, as at start.
        let mut not_utf8 = state(&["10.1.0.4"]).into_bytes();
        not_utf8.extend_from_slice(b"# \xff\n");
        std::fs::write(&path, not_utf8).unwrap();
        wait_for_metric(&telemetry, "carousel_config_errors_total 3").await;
        assert_eq!(**updates.borrow(), table_of(&second));
        assert!(!updates.has_changed().unwrap());

        // A good version again is applied.
        let third = state(&["10.1.0.3"]);
        std::fs::write(&path, &third).unwrap();
        let table = next_table(&mut updates).await;
        assert_eq!(endpoints(&table, "web"), ["10.1.0.3:8080"]);
        assert_eq!(*table, table_of(&third));

        // The watcher stops once nobody listens.
        drop(updates);
        tokio::time::timeout(WAIT, watcher)
            .await
            .expect("watcher did not stop")
            .unwrap();
    }

    #[tokio::test]
    async fn watch_applies_a_change_made_between_load_and_watch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, state(&["10.1.0.1"])).unwrap();
        let initial = load(&path, &Scope::default()).unwrap();
        let (tables, mut updates) = watch::channel(Arc::new(initial.table.clone()));
        updates.borrow_and_update();
        // The file changes after it was loaded but before the watcher first looks at it.
        let second = state(&["10.1.0.2"]);
        std::fs::write(&path, &second).unwrap();
        let watcher = tokio::spawn(watch(
            path.clone(),
            Scope::default(),
            tables,
            Telemetry::new(),
            initial,
        ));
        let table = next_table(&mut updates).await;
        assert_eq!(endpoints(&table, "web"), ["10.1.0.2:8080"]);
        watcher.abort();
    }

    #[tokio::test]
    async fn a_fifo_a_device_an_empty_or_an_oversized_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let link = |name: &str, to: &Path| {
            let at = dir.path().join(name);
            std::os::unix::fs::symlink(to, &at).unwrap();
            at
        };
        let to_fifo = link("state-fifo.yaml", &fifo);
        let to_zero = link("state-zero.yaml", Path::new("/dev/zero"));
        let empty = dir.path().join("empty.yaml");
        std::fs::write(&empty, " \n\n").unwrap();
        // Sparse: over the limit without taking the disk space.
        let huge = dir.path().join("huge.yaml");
        std::fs::File::create(&huge)
            .unwrap()
            .set_len(MAX_BYTES + 1)
            .unwrap();
        for (path, wanted) in [
            (to_fifo, "is not a regular file"),
            (to_zero, "is not a regular file"),
            (empty, "is empty"),
            (huge, &format!("over the limit of {MAX_BYTES} bytes")),
        ] {
            // On a thread with a deadline: a reader that blocked would hang here.
            let at = path.clone();
            let loaded = tokio::time::timeout(
                WAIT,
                tokio::task::spawn_blocking(move || load(&at, &Scope::default())),
            )
            .await
            .expect("the read does not block")
            .unwrap();
            let message = loaded.unwrap_err().to_string();
            assert!(message.contains(wanted), "{}: {message}", path.display());
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
    }

    #[tokio::test]
    async fn a_file_truncated_or_written_in_pieces_is_applied_only_once_settled() {
        let first = state(&["10.1.0.1"]);
        let Watching {
            _dir,
            path,
            mut updates,
            telemetry,
            watcher,
        } = start_watching(&first);
        // Emptied for a second, then written back: refused, and the table stays.
        std::fs::write(&path, "").unwrap();
        wait_for_metric(&telemetry, "carousel_config_errors_total 1").await;
        std::fs::write(&path, &first).unwrap();
        // Written in four pieces a third of a second apart, as a slow `kubectl get -o
        // yaml > state.yaml` does: every prefix that ends a document is a good file.
        let last = state(&["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"]);
        let cut = last.len() / 4;
        let mut file = std::fs::File::create(&path).unwrap();
        for piece in last.as_bytes().chunks(cut) {
            use std::io::Write as _;
            file.write_all(piece).unwrap();
            tokio::time::sleep(Duration::from_millis(330)).await;
        }
        drop(file);
        let table = next_table(&mut updates).await;
        assert_eq!(
            endpoints(&table, "web"),
            [
                "10.1.0.1:8080",
                "10.1.0.2:8080",
                "10.1.0.3:8080",
                "10.1.0.4:8080"
            ],
            "a piece of the file was applied"
        );
        assert_eq!(*table, table_of(&last));
        watcher.abort();
    }
}
