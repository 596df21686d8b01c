//! Watches: one etcd watch per [`Datastore::watch`](crate::Datastore::watch), mapped to the
//! contract's events and resumed across lost connections.
//!
//! A task owns the etcd watch and feeds a bounded channel, so that a slow consumer holds back
//! etcd (through gRPC flow control) instead of growing memory. It tracks the newest revision
//! whose events it has fully delivered; when the connection breaks (etcd restarted, the
//! endpoint went away, a member lost its leader) it opens a new etcd watch from the next
//! revision, on whichever endpoint answers. Because etcd keeps history by revision, the
//! consumer sees no gap and no duplicate, only a pause. Two things end the stream:
//!
//! - the history after the last delivered revision was compacted (before or during the outage):
//!   [`Error::Compacted`], and the consumer re-lists ([`crate::sync`] does);
//! - no endpoint took the watch back within [`EtcdOptions::watch_reconnect`]:
//!   [`Error::Unavailable`], so that the consumer knows it is not hearing the store.
//!
//! etcd sends all the events of one revision in one response (it only splits revisions when
//! asked to fragment, which this watch does not), so "delivered through the last event of the
//! last response" is exact.

use std::time::{Duration, Instant};

use etcd_client::{
    Client, EventType as EtcdEventType, WatchOptions, WatchResponse, WatchStream as EtcdWatch,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::keys::{WATCH_RANGE_END, WATCH_RANGE_START, parse_etcd_key};
use super::{
    EtcdOptions, Failure, MAX_MESSAGE, Retry, decode, request_err, revision_from, revision_to,
    send, timeout_err,
};
use crate::backend::{Error, EventType, Key, Revision, WatchEvent, WatchStream};

/// How many events a watch may hold for its consumer before it stops reading from etcd.
const WATCH_BUFFER: usize = 256;

/// The first pause before trying to resume a lost watch, doubled up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// Opens a watch of every change after `from` and returns its stream. The first etcd watch is
/// opened here, so that an unreachable etcd is reported by the call itself.
pub(super) async fn start(
    client: Client,
    options: EtcdOptions,
    from: Revision,
) -> Result<WatchStream, Error> {
    let next = from
        .checked_add(1)
        .ok_or_else(|| Error::Invalid(format!("cannot watch from revision {from}")))?;
    revision_to(next)?;
    let watcher = Watcher {
        client,
        options,
        next,
        lost_since: None,
    };
    let etcd = watcher.open().await?;
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    tokio::spawn(watcher.run(etcd, tx));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

struct Watcher {
    client: Client,
    options: EtcdOptions,
    /// The first revision not yet delivered: the start of the next etcd watch.
    next: Revision,
    /// When the watch was lost, if it has not been heard from since. Only a response from etcd
    /// resets it, so that a member that accepts watches and drops them at once cannot keep the
    /// watch "resuming" forever.
    lost_since: Option<Instant>,
}

/// Why the etcd watch in hand is over.
enum End {
    /// The consumer dropped the stream, or an error was delivered: stop.
    Done,
    /// The connection is gone: resume from `next`.
    Lost(String),
}

type Tx = mpsc::Sender<Result<WatchEvent, Error>>;

impl Watcher {
    /// Opens an etcd watch of our key range from `self.next`, with the previous value of each
    /// key (a `Deleted` event carries the object as last stored).
    async fn open(&self) -> Result<EtcdWatch, Error> {
        let options = WatchOptions::new()
            .with_range(WATCH_RANGE_END)
            .with_start_revision(revision_to(self.next)?)
            .with_prev_key()
            // Lets the watch advance past revisions that touch none of its keys, so that a
            // resumed watch on a quiet prefix does not start from before a compaction.
            .with_progress_notify();
        let client = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE);
        // Opening a watch changes nothing, so a lost answer may be retried.
        send(&self.options, Retry::Idempotent, || {
            let mut client = client.clone();
            let options = options.clone();
            async move { client.watch(WATCH_RANGE_START, Some(options)).await }
        })
        .await
        .map_err(|failure| match failure {
            Failure::Etcd(e) => request_err(&self.options, "a watch", e),
            Failure::Timeout => timeout_err(&self.options, "a watch"),
        })
    }

    async fn run(mut self, mut etcd: EtcdWatch, tx: Tx) {
        loop {
            match self.follow(&mut etcd, &tx).await {
                End::Done => return,
                End::Lost(why) => {
                    tracing::info!(
                        store = self.options.describe(),
                        from = self.next,
                        reason = why,
                        "lost the etcd watch; resuming it"
                    );
                    match self.resume(&tx, why).await {
                        Some(resumed) => etcd = resumed,
                        None => return,
                    }
                }
            }
        }
    }

    /// Delivers the events of one etcd watch until it ends.
    async fn follow(&mut self, etcd: &mut EtcdWatch, tx: &Tx) -> End {
        loop {
            let message = tokio::select! {
                () = tx.closed() => return End::Done,
                message = etcd.message() => message,
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => return End::Lost("etcd closed the watch stream".to_owned()),
                Err(e) => return End::Lost(e.to_string()),
            };
            if let Some(end) = self.deliver(response, tx).await {
                return end;
            }
        }
    }

    /// Handles one response; `Some` when the etcd watch is over.
    async fn deliver(&mut self, response: WatchResponse, tx: &Tx) -> Option<End> {
        if response.compact_revision() > 0 {
            let oldest = revision_from(response.compact_revision()).unwrap_or(0);
            // etcd can still serve a watch *starting* at its compaction revision: in the
            // contract's terms (a watch *from* R starts after R) that is one less.
            let _ = tx
                .send(Err(Error::Compacted {
                    requested: self.next - 1,
                    oldest: oldest.saturating_sub(1),
                }))
                .await;
            return Some(End::Done);
        }
        if !response.canceled() {
            self.lost_since = None;
        }
        if response.canceled() && response.cancel_reason().contains("permission denied") {
            // Retrying cannot help: say what the user's role lacks.
            let _ = tx
                .send(Err(Error::Unavailable(format!(
                    "etcd at {} refused the watch ({}): the user needs read access to the whole \
                     key range from {WATCH_RANGE_START} to {WATCH_RANGE_END}, which one watch \
                     covers (docs/design/etcd.md)",
                    self.options.describe(),
                    response.cancel_reason()
                ))))
                .await;
            return Some(End::Done);
        }
        if response.canceled() {
            // Not compaction: etcd cancels watches when the member loses its leader or the
            // user's permissions change. Another attempt may reach a better member.
            return Some(End::Lost(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason()
            )));
        }
        let events = response.events();
        if events.is_empty() {
            // A progress notification: every change up to the header's revision was sent.
            if !response.created()
                && let Some(header) = response.header()
                && let Ok(revision) = revision_from(header.revision())
            {
                self.next = self.next.max(revision + 1);
            }
            return None;
        }
        let mut held: Option<WatchEvent> = None;
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let revision = match revision_from(kv.mod_revision()) {
                Ok(revision) => revision,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return Some(End::Done);
                }
            };
            let Some(key) = parse_etcd_key(kv.key()) else {
                // Inside the watched range, but not one of our kinds.
                continue;
            };
            let mapped = match event.event_type() {
                EtcdEventType::Put => decode(key, kv).map(|stored| WatchEvent {
                    // Version counts the writes since the key was (re)created.
                    event_type: if kv.version() == 1 {
                        EventType::Added
                    } else {
                        EventType::Modified
                    },
                    revision,
                    key: stored.key,
                    value: stored.value,
                    commit_complete: false,
                }),
                EtcdEventType::Delete => {
                    let last = match event.prev_kv() {
                        Some(prev) => decode(key.clone(), prev).map(|stored| stored.value),
                        None => Ok(tombstone(&key)),
                    };
                    last.map(|value| WatchEvent {
                        event_type: EventType::Deleted,
                        revision,
                        key,
                        value,
                        commit_complete: false,
                    })
                }
            };
            let event = match mapped {
                Ok(event) => event,
                Err(e) => {
                    if let Some(previous) = held.take() {
                        let _ = tx.send(Ok(previous)).await;
                    }
                    let _ = tx.send(Err(e)).await;
                    return Some(End::Done);
                }
            };
            // Held back one event: etcd sends every event of a revision in one response, so
            // the next event (or the end of the response) says whether it was its commit's last.
            if let Some(mut previous) = held.replace(event) {
                previous.commit_complete = held
                    .as_ref()
                    .is_some_and(|e| e.revision != previous.revision);
                if tx.send(Ok(previous)).await.is_err() {
                    return Some(End::Done);
                }
            }
        }
        if let Some(mut last) = held.take() {
            last.commit_complete = true;
            if tx.send(Ok(last)).await.is_err() {
                return Some(End::Done);
            }
        }
        // Every event of the revisions in this response has been delivered.
        self.next = self.next.max(
            events
                .last()
                .and_then(|e| e.kv())
                .and_then(|kv| revision_from(kv.mod_revision()).ok())
                .map_or(self.next, |r| r + 1),
        );
        None
    }

    /// Opens a new etcd watch from `self.next`, retrying with back-off for as long as
    /// [`EtcdOptions::watch_reconnect`] allows. `None` when the stream is over (the consumer
    /// left, or the outage lasted too long and that was reported).
    async fn resume(&mut self, tx: &Tx, mut why: String) -> Option<EtcdWatch> {
        let deadline =
            *self.lost_since.get_or_insert_with(Instant::now) + self.options.watch_reconnect;
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let _ = tx
                    .send(Err(Error::Unavailable(format!(
                        "lost the watch on etcd at {} and could not resume it within {:?}: {why}",
                        self.options.describe(),
                        self.options.watch_reconnect
                    ))))
                    .await;
                return None;
            }
            tokio::select! {
                () = tx.closed() => return None,
                () = tokio::time::sleep(delay.min(deadline - now)) => {}
            }
            delay = (delay * 2).min(MAX_RETRY_DELAY);
            // An endpoint that swallows packets would hold one attempt for the whole request
            // timeout: keep to the deadline.
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.open()).await {
                Ok(Ok(etcd)) => return Some(etcd),
                Ok(Err(e)) => why = e.to_string(),
                Err(_) => why = format!("no endpoint accepted a watch within {left:?}"),
            }
        }
    }
}

/// What a `Deleted` event carries when etcd no longer has the deleted object's last value (its
/// revision was compacted while the watch caught up): the key's identity, which is all that a
/// consumer of a deletion needs.
fn tombstone(key: &Key) -> Value {
    let mut metadata = json!({"name": key.name});
    if let Some(ns) = &key.namespace {
        metadata["namespace"] = json!(ns);
    }
    json!({
        "apiVersion": key.kind.api_version(),
        "kind": key.kind.as_str(),
        "metadata": metadata,
    })
}
