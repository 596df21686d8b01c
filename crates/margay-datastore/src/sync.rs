//! List + watch as one stream of changes with an explicit sync status.
//!
//! Consumers such as the node agent need a local copy of some kinds of resource that follows the
//! store, and they need to know *how far* to trust that copy: programming the dataplane from a
//! half-read store would, for example, drop traffic to services not read yet. [`sync`] keeps the
//! copy's contents in step and says through [`SyncStatus`] when it is complete.
//!
//! The stream never ends and never yields an error: failures are reported as status changes and
//! retried with exponential back-off (100 ms doubling up to 5 s), and after every re-list it emits
//! only the differences from what it emitted before, so consumers see exactly the real changes.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use margay_api::Kind;

use crate::backend::{
    Datastore, Error, EventType, Key, ListRequest, Listing, Revision, Stored, WatchEvent,
    WatchStream,
};

/// How complete the consumer's copy is. Emitted whenever it changes.
///
/// A consumer must not write dataplane state before the first [`SyncStatus::InSync`]: until then
/// its copy may miss objects that exist. After that it keeps what it has through
/// [`SyncStatus::Resyncing`] (stale but consistent beats empty) and applies the differences that
/// follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncStatus {
    /// Emitted first. The store has not been listed successfully yet, so the updates so far (if
    /// any) are not the whole picture. Retries continue silently while the store is unreachable.
    WaitingForDatastore,
    /// The watch was lost (history compacted, store unavailable). The copy is what it was at the
    /// last [`SyncStatus::InSync`] plus the updates since, and may be behind the store. The
    /// updates that follow bring it up to date; [`SyncStatus::InSync`] marks the end.
    Resyncing,
    /// The copy equals the store at some revision and live updates follow.
    InSync,
}

/// One item of a [`sync`] stream.
#[derive(Clone, Debug, PartialEq)]
pub enum SyncUpdate {
    Status(SyncStatus),
    /// The object is new or changed (never emitted for an unchanged object).
    Upsert(Stored),
    /// The object is gone (only emitted for objects previously upserted).
    Remove(Key),
    /// The updates emitted so far reflect the whole store at this revision (every kind, not
    /// only the followed ones): a consumer that has applied them is up to date with any write
    /// that returned this revision or an earlier one. Emitted after each listing and after the
    /// last change of each commit.
    Progress(Revision),
}

/// The stream [`sync`] returns.
pub type SyncStream = Pin<Box<dyn Stream<Item = SyncUpdate> + Send>>;

/// The first delay before retrying after a failure.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// The longest delay between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long the watch may stay quiet before the last change seen counts as the end of its
/// commit (the changes of one commit arrive back to back), for changes whose backend did not
/// mark the last of its commit ([`crate::WatchEvent::commit_complete`]).
const COMMIT_SETTLE: Duration = Duration::from_millis(15);
/// A failure this long after the previous one starts the back-off afresh.
const BACKOFF_RESET: Duration = Duration::from_secs(30);

/// Follows the objects of `kinds` in `ds`.
///
/// Emits [`SyncStatus::WaitingForDatastore`], then an [`SyncUpdate::Upsert`] for every object of
/// one consistent listing, then [`SyncStatus::InSync`], then the changes as they are committed.
/// When the watch is lost it emits [`SyncStatus::Resyncing`], lists again, emits the differences
/// from what it emitted before and [`SyncStatus::InSync`]. The stream is lazy (nothing happens
/// until it is polled) and needs a tokio runtime with timers.
pub fn sync(ds: Arc<dyn Datastore>, kinds: Vec<Kind>) -> SyncStream {
    let syncer = Syncer {
        ds,
        kinds,
        cache: BTreeMap::new(),
        out: VecDeque::new(),
        phase: Phase::Start,
        backoff: INITIAL_BACKOFF,
        last_failure: None,
    };
    Box::pin(futures::stream::unfold(syncer, |mut syncer| async move {
        let update = syncer.next_update().await;
        Some((update, syncer))
    }))
}

struct Syncer {
    ds: Arc<dyn Datastore>,
    kinds: Vec<Kind>,
    /// What the consumer has been told.
    cache: BTreeMap<Key, Stored>,
    /// Updates decided but not yet yielded.
    out: VecDeque<SyncUpdate>,
    phase: Phase,
    backoff: Duration,
    last_failure: Option<Instant>,
}

enum Phase {
    Start,
    /// List the store, after waiting `delay`.
    List {
        delay: Option<Duration>,
    },
    /// Follow the changes after `from`; `stream` is opened on first use.
    Watch {
        from: Revision,
        stream: Option<WatchStream>,
        /// The revision of the last change applied, not yet reported as [`SyncUpdate::Progress`]
        /// because more changes of the same commit may follow.
        unreported: Option<Revision>,
    },
}

impl Syncer {
    async fn next_update(&mut self) -> SyncUpdate {
        loop {
            if let Some(update) = self.out.pop_front() {
                return update;
            }
            self.advance().await;
        }
    }

    /// Takes one step; may or may not queue updates.
    async fn advance(&mut self) {
        match std::mem::replace(&mut self.phase, Phase::Start) {
            Phase::Start => {
                self.out
                    .push_back(SyncUpdate::Status(SyncStatus::WaitingForDatastore));
                self.phase = Phase::List { delay: None };
            }
            Phase::List { delay } => {
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                match self.ds.list(&self.request()).await {
                    Ok(listing) => {
                        let from = listing.revision;
                        self.apply_listing(listing);
                        self.out.push_back(SyncUpdate::Progress(from));
                        self.out.push_back(SyncUpdate::Status(SyncStatus::InSync));
                        self.phase = Phase::Watch {
                            from,
                            stream: None,
                            unreported: None,
                        };
                    }
                    Err(e) => {
                        let delay = self.next_backoff();
                        tracing::warn!(
                            error = %e, store = self.ds.describe(), retry_in = ?delay,
                            "cannot list the datastore"
                        );
                        self.phase = Phase::List { delay: Some(delay) };
                    }
                }
            }
            Phase::Watch {
                from,
                stream,
                unreported,
            } => {
                let mut stream = match stream {
                    Some(stream) => stream,
                    None => match self.ds.watch(from).await {
                        Ok(stream) => stream,
                        Err(e) => return self.lost(e),
                    },
                };
                let next = match unreported {
                    // A commit's changes arrive back to back: a short quiet spell ends it.
                    Some(revision) => {
                        match tokio::time::timeout(COMMIT_SETTLE, stream.next()).await {
                            Ok(next) => next,
                            Err(_) => {
                                self.out.push_back(SyncUpdate::Progress(revision));
                                self.phase = Phase::Watch {
                                    from,
                                    stream: Some(stream),
                                    unreported: None,
                                };
                                return;
                            }
                        }
                    }
                    None => stream.next().await,
                };
                match next {
                    Some(Ok(event)) => {
                        if let Some(previous) = unreported
                            && event.revision > previous
                        {
                            self.out.push_back(SyncUpdate::Progress(previous));
                        }
                        let from = event.revision;
                        let complete = event.commit_complete;
                        self.apply_event(event);
                        // The backend says the commit is whole: report it now rather than
                        // after COMMIT_SETTLE of quiet (the delay of every single change).
                        if complete {
                            self.out.push_back(SyncUpdate::Progress(from));
                        }
                        self.phase = Phase::Watch {
                            from,
                            stream: Some(stream),
                            unreported: (!complete).then_some(from),
                        };
                    }
                    Some(Err(e)) => self.lost(e),
                    None => self.lost(Error::Unavailable("the watch ended".to_owned())),
                }
            }
        }
    }

    /// One listing covers every wanted kind, so that they all come from the same snapshot.
    fn request(&self) -> ListRequest {
        ListRequest {
            kind: match self.kinds.as_slice() {
                [kind] => Some(*kind),
                _ => None,
            },
            namespace: None,
        }
    }

    /// Queues the differences between the cache and `listing`, and adopts the listing.
    fn apply_listing(&mut self, listing: Listing) {
        let fresh: BTreeMap<Key, Stored> = listing
            .items
            .into_iter()
            .filter(|item| self.kinds.contains(&item.key.kind))
            .map(|item| (item.key.clone(), item))
            .collect();
        for (key, item) in &fresh {
            if self.cache.get(key) != Some(item) {
                self.out.push_back(SyncUpdate::Upsert(item.clone()));
            }
        }
        for key in self.cache.keys() {
            if !fresh.contains_key(key) {
                self.out.push_back(SyncUpdate::Remove(key.clone()));
            }
        }
        self.cache = fresh;
    }

    fn apply_event(&mut self, event: WatchEvent) {
        if !self.kinds.contains(&event.key.kind) {
            return;
        }
        match event.event_type {
            EventType::Added | EventType::Modified => {
                let stored = Stored {
                    key: event.key,
                    revision: event.revision,
                    value: event.value,
                };
                if self.cache.get(&stored.key) != Some(&stored) {
                    self.cache.insert(stored.key.clone(), stored.clone());
                    self.out.push_back(SyncUpdate::Upsert(stored));
                }
            }
            EventType::Deleted => {
                if self.cache.remove(&event.key).is_some() {
                    self.out.push_back(SyncUpdate::Remove(event.key));
                }
            }
        }
    }

    /// The watch is gone: report it and list again after a pause.
    fn lost(&mut self, error: Error) {
        let delay = self.next_backoff();
        match error {
            Error::Compacted { .. } => tracing::info!(
                error = %error, store = self.ds.describe(),
                "the watch fell behind the datastore's history; listing again"
            ),
            _ => tracing::warn!(
                error = %error, store = self.ds.describe(), retry_in = ?delay,
                "lost the datastore watch; listing again"
            ),
        }
        self.out
            .push_back(SyncUpdate::Status(SyncStatus::Resyncing));
        self.phase = Phase::List { delay: Some(delay) };
    }

    fn next_backoff(&mut self) -> Duration {
        let now = Instant::now();
        self.backoff = match self.last_failure {
            Some(last) if now.duration_since(last) < BACKOFF_RESET => {
                (self.backoff * 2).min(MAX_BACKOFF)
            }
            _ => INITIAL_BACKOFF,
        };
        self.last_failure = Some(now);
        self.backoff
    }
}
