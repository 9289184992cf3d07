//! The durable outbox: every result is committed to SQLite before a source is told it was accepted, and leaves the
//! outbox only once the MQTT broker has acknowledged it.
//!
//! One worker thread owns the SQLite connection. Writes that arrive together are committed in one transaction
//! (group commit), so `synchronous=FULL` costs one fsync per burst rather than one per result. The counters behind
//! [`Outbox::depth`] are kept by that thread, so status and metrics never touch the database.
//!
//! Beside the results it keeps camera frames whose results could not be stored yet ([`KeptFrame`]): a frame
//! exists nowhere else, so this is where it outlives the process. And with each result it records the hot-folder
//! files the result covers ([`CoveredFile`]), in the same transaction, so that a file a crash left in its folder after
//! its result was stored is filed at the next start instead of being processed into a second result.

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

/// Schema version written to `PRAGMA user_version`; `open` migrates older files step by step.
const SCHEMA_VERSION: i64 = 3;
/// Covered-file records kept (the newest): a record only matters between its result's commit and its file's move to
/// `done/`, and a crash leaves at most the few results committed just before it unfiled.
pub const COVERED_FILES_KEPT: i64 = 10_000;
/// Upper bound of operations committed in one transaction, so one reply never waits behind an unbounded burst.
const MAX_GROUP: usize = 512;
/// How often the "outbox full" alarm may be logged.
const ALARM_INTERVAL: Duration = Duration::from_secs(10);

/// Where the outbox lives and how much it may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// SQLite database file; its directory is created if missing. Keep it on persistent storage: results the
    /// broker has not acknowledged live only here.
    pub path: PathBuf,
    /// Most results held at once (unacknowledged by the broker).
    pub max_messages: u64,
    /// Most payload bytes held at once.
    pub max_bytes: u64,
    /// What happens to a new result when either limit is reached.
    pub when_full: FullPolicy,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/var/lib/attrd/outbox.sqlite3"),
            max_messages: 100_000,
            max_bytes: 512 * 1024 * 1024,
            when_full: FullPolicy::RejectNew,
        }
    }
}

impl OutboxConfig {
    pub fn validate(&self) -> Result<(), OutboxError> {
        if self.max_messages == 0 || self.max_bytes == 0 {
            return Err(OutboxError::Config("max_messages and max_bytes must be greater than 0".into()));
        }
        Ok(())
    }
}

/// Behaviour of a full outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Refuse new results with [`OutboxError::Full`]; sources keep their files and retry, and nothing already
    /// accepted is ever dropped.
    #[default]
    RejectNew,
    /// Delete the oldest unpublished results to make room; each drop is logged as an error.
    DropOldest,
}

/// Errors of the outbox. Every failure is returned to the caller; the outbox itself keeps running and recovers
/// once the cause (a full disk, a read-only directory) goes away.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The outbox holds its configured maximum; the result was not accepted.
    #[error("outbox full ({messages} messages, {bytes} bytes): result not accepted, the source must retry later")]
    Full {
        /// Messages held.
        messages: u64,
        /// Payload bytes held.
        bytes: u64,
    },
    /// A single message is larger than the whole outbox may hold.
    #[error("message of {bytes} bytes exceeds the outbox limit of {max_bytes} bytes")]
    TooLarge {
        /// Size of the rejected payload.
        bytes: u64,
        /// `max_bytes` of the configuration.
        max_bytes: u64,
    },
    /// The payload must be a JSON object, because `seq` and `message_id` are inserted into it.
    #[error("outbox payload must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// The topic cannot be published (empty, wildcard, NUL).
    #[error("invalid MQTT topic {0:?} for the outbox")]
    InvalidTopic(String),
    /// QoS must be 0 or 1. QoS 2 is refused: the outbox with its stable `message_id` already gives at-least-once
    /// without loss and duplicates a subscriber can drop, and rumqttc hands a QoS 2 message's packet id to the next
    /// publish once PUBREC arrives, so its PUBCOMP could be taken for another message's acknowledgement.
    #[error("MQTT QoS {0} is not supported for stored messages (0 or 1)")]
    InvalidQos(u8),
    /// The configuration cannot work (for example a zero limit).
    #[error("invalid outbox configuration: {0}")]
    Config(String),
    /// The state directory could not be created.
    #[error("cannot create outbox directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened or prepared.
    #[error("cannot open outbox database {}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer attrd.
    #[error("outbox database {} has schema version {found}; this attrd supports up to {supported}", path.display())]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// `user_version` found in the file.
        found: i64,
        /// Newest version this build knows.
        supported: i64,
    },
    /// A database operation failed (disk full, I/O error, …); nothing of the failed transaction was committed.
    #[error("outbox database operation failed")]
    Sqlite(#[source] Arc<rusqlite::Error>),
    /// The worker thread could not be started.
    #[error("cannot start the outbox worker thread")]
    Spawn(#[source] std::io::Error),
    /// The worker thread is gone (it only stops when the last `Outbox` handle is dropped).
    #[error("outbox worker stopped")]
    Closed,
}

impl OutboxError {
    /// The error is about the message itself (too large, not an object, a bad topic or QoS): storing the same
    /// message again will be refused again, whatever the outbox's state.
    pub fn refuses_the_message(&self) -> bool {
        matches!(
            self,
            OutboxError::TooLarge { .. }
                | OutboxError::NotAnObject(_)
                | OutboxError::InvalidTopic(_)
                | OutboxError::InvalidQos(_)
        )
    }
}

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(Arc::new(e))
    }
}

/// What [`Outbox::enqueue`] committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// Row id: strictly increasing in enqueue order and never reused, the replay order.
    pub id: i64,
    /// Per-node sequence number, also inserted into the payload as `seq`; survives restarts.
    pub seq: u64,
    /// UUIDv7 inserted into the payload as `message_id`; duplicates after a reconnect carry the same one.
    pub message_id: Uuid,
    /// Older unpublished messages deleted to make room for this one (policy `drop_oldest` on a full outbox); 0
    /// otherwise.
    pub dropped: u64,
}

/// A message for [`Outbox::enqueue_many`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// MQTT topic (no wildcards).
    pub topic: String,
    /// A JSON object; `seq` and `message_id` are inserted into it.
    pub payload: serde_json::Value,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// Whether to publish retained.
    pub retain: bool,
    /// The message's id; a waiting message with the same id is returned instead of adding another.
    pub message_id: Uuid,
    /// The hot-folder files it is the result of, recorded in the same transaction ([`Outbox::covered_files_blocking`]).
    pub covers: Vec<CoveredFile>,
    /// Keys of kept camera frames it is the result of ([`Outbox::keep_frame`]), released in the same transaction: a
    /// crash cannot leave both, which would send the frame again into another result.
    pub releases: Vec<i64>,
}

/// Which version of a file was read: its device and inode, length and modification time. A file replaced under the
/// same name (written again, or another renamed over it) has another version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileVersion {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Length in bytes.
    pub len: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// A hot-folder file a stored result covers: the file, in the version that was read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CoveredFile {
    /// Its path in the hot folder.
    pub path: PathBuf,
    /// The version that was read.
    pub version: FileVersion,
}

/// One stored message, as replayed to the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Row id (see [`Enqueued::id`]); pass it to [`Outbox::ack`].
    pub id: i64,
    /// Per-node sequence number.
    pub seq: u64,
    /// The message's UUIDv7.
    pub message_id: Uuid,
    /// MQTT topic.
    pub topic: String,
    /// The payload object, `seq` and `message_id` included.
    pub payload: serde_json::Value,
    /// Requested QoS.
    pub qos: u8,
    /// Whether to publish retained.
    pub retain: bool,
    /// When it was enqueued.
    pub created_at: OffsetDateTime,
}

/// One read of the stored messages ([`Outbox::read_batch`]): those that could be decoded, and how far the read got.
/// Undecodable rows (a damaged disk, a hand edit) are skipped but counted, so a reader tells "the table ends here"
/// from "this stretch was unreadable" and moves past them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// The decodable messages, oldest first.
    pub entries: Vec<Entry>,
    /// Rows read, the skipped ones included: fewer than the limit asked for means the table ends here.
    pub rows: usize,
    /// The id of the last row read, skipped or not: where the next read starts.
    pub last_id: Option<i64>,
}

/// A camera frame whose result could not be stored yet (outbox full or unwritable), kept beside the results so that it
/// outlives a restart or a crash (see `sources::HeldFrames`). A hot-folder file stays in its folder and an upload's
/// client sends it again, but a camera frame exists nowhere else.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptFrame {
    /// The camera's name.
    pub camera: String,
    /// The item's SKU.
    pub sku: String,
    /// The frame, as JPEG.
    pub jpeg: Vec<u8>,
    /// When the camera took it.
    pub captured_at: OffsetDateTime,
    /// Recorded frames replayed by a fake camera (demos, tests) rather than a V4L2 device.
    pub replayed: bool,
    /// The camera's retry backoff, shortest wait.
    pub retry_min: Duration,
    /// The camera's retry backoff, longest wait.
    pub retry_max: Duration,
}

/// How full the outbox is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Stats {
    /// Messages not yet acknowledged by the broker.
    pub messages: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Age of the oldest one; `None` when empty.
    #[serde(with = "humantime_serde")]
    pub oldest_age: Option<Duration>,
}

/// Handle to the outbox; cheap to clone, usable from any task or thread.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("path", &self.inner.path).field("depth", &self.depth()).finish()
    }
}

struct Inner {
    path: PathBuf,
    tx: Option<std_mpsc::Sender<Op>>,
    shared: Arc<Shared>,
    changes: watch::Receiver<u64>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the worker after it has finished what was queued; joining makes "all handles
        // dropped" mean "database closed", which a restart in the same process relies on.
        self.tx.take();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "outbox worker thread panicked");
        }
    }
}

/// Counters published by the worker after each commit.
#[derive(Debug, Default)]
struct Shared {
    stats: Mutex<Counters>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    messages: u64,
    bytes: u64,
    /// Enqueue time (Unix ms) of the oldest row.
    oldest_ms: Option<i64>,
}

enum Op {
    /// Applied in one transaction together with whatever else is queued.
    Writes(Vec<Write>),
    Batch {
        after: Option<i64>,
        limit: usize,
        reply: oneshot::Sender<Result<Batch, OutboxError>>,
    },
    KeepFrame {
        frame: Box<KeptFrame>,
        reply: oneshot::Sender<Result<i64, OutboxError>>,
    },
    ReleaseFrame {
        id: i64,
        reply: oneshot::Sender<Result<(), OutboxError>>,
    },
    KeptFrames {
        reply: oneshot::Sender<Result<Vec<(i64, KeptFrame)>, OutboxError>>,
    },
    Covered {
        dir: PathBuf,
        reply: oneshot::Sender<Result<Vec<(CoveredFile, Uuid)>, OutboxError>>,
    },
}

impl Op {
    /// Rows it touches, for bounding a group.
    fn size(&self) -> usize {
        match self {
            Op::Writes(w) => w.len().max(1),
            Op::Batch { .. }
            | Op::KeepFrame { .. }
            | Op::ReleaseFrame { .. }
            | Op::KeptFrames { .. }
            | Op::Covered { .. } => 1,
        }
    }
}

enum Write {
    Enqueue {
        topic: String,
        payload: serde_json::Map<String, serde_json::Value>,
        qos: u8,
        retain: bool,
        message_id: Uuid,
        covers: Vec<CoveredFile>,
        releases: Vec<i64>,
        reply: oneshot::Sender<Result<Enqueued, OutboxError>>,
    },
    Ack {
        id: i64,
        reply: oneshot::Sender<Result<(), OutboxError>>,
    },
}

impl Outbox {
    /// Opens (or creates) the outbox database, migrating its schema, and starts the worker thread.
    pub fn open(cfg: &OutboxConfig) -> Result<Self, OutboxError> {
        cfg.validate()?;
        let path = cfg.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OutboxError::CreateDir { path: dir.to_owned(), source })?;
        }
        let conn = open_connection(&path)?;
        let counters = load_counters(&conn).map_err(|source| OutboxError::Open { path: path.clone(), source })?;
        tracing::info!(path = %path.display(), messages = counters.messages, bytes = counters.bytes, "outbox opened");

        let shared = Arc::new(Shared { stats: Mutex::new(counters) });
        let (tx, rx) = std_mpsc::channel();
        let (changes_tx, changes) = watch::channel(0u64);
        let mut worker = Worker {
            conn,
            cfg: cfg.clone(),
            counters,
            shared: shared.clone(),
            changes: changes_tx,
            alarm: Alarm::default(),
        };
        let thread = std::thread::Builder::new()
            .name("attrd-outbox".into())
            .spawn(move || worker.run(rx))
            .map_err(OutboxError::Spawn)?;
        Ok(Self { inner: Arc::new(Inner { path, tx: Some(tx), shared, changes, thread: Some(thread) }) })
    }

    /// Stores a message durably. `seq` and `message_id` are inserted into `payload` (replacing keys of those names).
    /// `Ok` means the transaction is committed with `synchronous=FULL`: the message survives a crash or power loss.
    pub async fn enqueue(
        &self,
        topic: String,
        payload: serde_json::Value,
        qos: u8,
        retain: bool,
    ) -> Result<Enqueued, OutboxError> {
        self.enqueue_with_id(topic, payload, qos, retain, Uuid::now_v7()).await
    }

    /// Like [`enqueue`](Self::enqueue) with a caller-chosen `message_id`, derived from what the message is about (the
    /// daemon uses node, SKU, image hashes and model): if a message with this id is still waiting, nothing is added and
    /// the waiting one is returned. So a photo processed again after a crash yields the same `message_id`, and a
    /// subscriber sees at most duplicates of one id, never two results for one photo.
    pub async fn enqueue_with_id(
        &self,
        topic: String,
        payload: serde_json::Value,
        qos: u8,
        retain: bool,
        message_id: Uuid,
    ) -> Result<Enqueued, OutboxError> {
        let msg = NewMessage { topic, payload, qos, retain, message_id, covers: Vec::new(), releases: Vec::new() };
        let mut results = self.enqueue_many(vec![msg]).await;
        results.pop().unwrap_or(Err(OutboxError::Closed))
    }

    /// Stores several messages in one transaction (one fsync for all of them) and returns one verdict per message, in
    /// order. Each message is judged on its own, exactly as [`enqueue_with_id`](Self::enqueue_with_id) would: an
    /// invalid or rejected one does not stop the others. A database failure fails all of them, as nothing was
    /// committed.
    ///
    /// This is how a producer with many results at once (the daemon's micro-batches) gets past one fsync per
    /// result: awaiting single enqueues one after another commits each separately.
    pub async fn enqueue_many(&self, msgs: Vec<NewMessage>) -> Vec<Result<Enqueued, OutboxError>> {
        let mut writes = Vec::with_capacity(msgs.len());
        let mut replies = Vec::with_capacity(msgs.len());
        for m in msgs {
            match validate(m) {
                Ok((topic, payload, qos, retain, message_id, covers, releases)) => {
                    let (reply, rx) = oneshot::channel();
                    writes.push(Write::Enqueue { topic, payload, qos, retain, message_id, covers, releases, reply });
                    replies.push(Ok(rx));
                }
                Err(e) => replies.push(Err(e)),
            }
        }
        let sent = if writes.is_empty() { Ok(()) } else { self.send(Op::Writes(writes)) };
        let mut out = Vec::with_capacity(replies.len());
        for r in replies {
            out.push(match (r, &sent) {
                (Err(e), _) => Err(e),
                (Ok(_), Err(_)) => Err(OutboxError::Closed),
                (Ok(rx), Ok(())) => rx.await.unwrap_or(Err(OutboxError::Closed)),
            });
        }
        out
    }

    /// Up to `limit` stored messages with an id greater than `after_id`, oldest first. Rows that cannot be decoded
    /// are left in place, logged and skipped, so there may be fewer even where more follow: a reader that goes on
    /// until the table ends uses [`read_batch`](Self::read_batch).
    pub async fn next_batch(&self, after_id: Option<i64>, limit: usize) -> Result<Vec<Entry>, OutboxError> {
        Ok(self.read_batch(after_id, limit).await?.entries)
    }

    /// Reads up to `limit` rows with an id greater than `after_id`, oldest first, and says how far it got.
    pub async fn read_batch(&self, after_id: Option<i64>, limit: usize) -> Result<Batch, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Batch { after: after_id, limit, reply })?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Deletes a message once the broker has acknowledged it. Unknown ids (already acked, dropped) are fine.
    pub async fn ack(&self, id: i64) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Writes(vec![Write::Ack { id, reply }]))?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Keeps a camera frame durably (committed with `synchronous=FULL`) until [`release_frame`](Self::release_frame);
    /// returns its key. Frames do not count against `max_messages` / `max_bytes`: those bound results, and a
    /// camera's `max_in_flight` bounds its frames.
    pub async fn keep_frame(&self, frame: KeptFrame) -> Result<i64, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::KeepFrame { frame: Box::new(frame), reply })?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Deletes a kept frame whose result can never be stored (a stored result's transaction deletes its frames:
    /// [`NewMessage::releases`]). Unknown keys are fine.
    pub async fn release_frame(&self, id: i64) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::ReleaseFrame { id, reply })?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Every kept frame with its key, oldest first.
    pub async fn kept_frames(&self) -> Result<Vec<(i64, KeptFrame)>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::KeptFrames { reply })?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// The hot-folder files under `dir` (its direct children) that stored results cover, with the version read and
    /// the result's `message_id`, oldest first. Blocking: for the hot folder's own thread, not an async task.
    pub fn covered_files_blocking(&self, dir: &Path) -> Result<Vec<(CoveredFile, Uuid)>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Covered { dir: dir.to_owned(), reply })?;
        rx.blocking_recv().map_err(|_| OutboxError::Closed)?
    }

    /// Current fill level, from counters kept in memory (no database access).
    pub fn depth(&self) -> Stats {
        let c = *self.inner.shared.stats.lock().unwrap_or_else(PoisonError::into_inner);
        let oldest_age = c.oldest_ms.map(|ms| {
            let age_ms = now_ms().saturating_sub(ms);
            Duration::from_millis(u64::try_from(age_ms).unwrap_or(0))
        });
        Stats { messages: c.messages, bytes: c.bytes, oldest_age }
    }

    /// A counter bumped after every committed enqueue, so a publisher can sleep until there is something new.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.clone()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn send(&self, op: Op) -> Result<(), OutboxError> {
        self.inner.tx.as_ref().ok_or(OutboxError::Closed)?.send(op).map_err(|_| OutboxError::Closed)
    }
}

type Validated = (String, serde_json::Map<String, serde_json::Value>, u8, bool, Uuid, Vec<CoveredFile>, Vec<i64>);

fn validate(m: NewMessage) -> Result<Validated, OutboxError> {
    if m.qos > 1 {
        return Err(OutboxError::InvalidQos(m.qos));
    }
    let topic = m.topic;
    if topic.is_empty() || topic.contains(['+', '#', '\0']) || topic.len() > usize::from(u16::MAX) {
        return Err(OutboxError::InvalidTopic(topic));
    }
    match m.payload {
        serde_json::Value::Object(p) => Ok((topic, p, m.qos, m.retain, m.message_id, m.covers, m.releases)),
        other => Err(OutboxError::NotAnObject(json_kind(&other))),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn open_connection(path: &Path) -> Result<Connection, OutboxError> {
    let open_err = |source| OutboxError::Open { path: path.to_owned(), source };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(open_err)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "outbox could not switch to WAL journaling");
    }
    // FULL makes every commit (and so every acknowledged result) durable across power loss, also in WAL mode.
    conn.pragma_update(None, "synchronous", "FULL").map_err(open_err)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), OutboxError> {
    let open_err = |source| OutboxError::Open { path: path.to_owned(), source };
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(open_err)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(open_err)?;
    if version > SCHEMA_VERSION {
        return Err(OutboxError::SchemaTooNew { path: path.to_owned(), found: version, supported: SCHEMA_VERSION });
    }
    if version < 1 {
        // AUTOINCREMENT: ids are never reused, even after the table was emptied, so a publisher's "after id" cursor
        // can never skip a newer row.
        tx.execute_batch(
            "CREATE TABLE outbox (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 seq INTEGER NOT NULL UNIQUE,
                 message_id TEXT NOT NULL,
                 topic TEXT NOT NULL,
                 payload TEXT NOT NULL,
                 qos INTEGER NOT NULL,
                 retain INTEGER NOT NULL,
                 created_at_ms INTEGER NOT NULL,
                 bytes INTEGER NOT NULL
             );
             CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO meta (key, value) VALUES ('next_seq', 1);",
        )
        .map_err(open_err)?;
    }
    if version < 2 {
        // Idempotent enqueues look messages up by id.
        tx.execute_batch("CREATE INDEX IF NOT EXISTS outbox_message_id ON outbox (message_id);").map_err(open_err)?;
    }
    if version < 3 {
        tx.execute_batch(
            "CREATE TABLE covered_files (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 path BLOB NOT NULL,
                 dev INTEGER NOT NULL,
                 ino INTEGER NOT NULL,
                 len INTEGER NOT NULL,
                 mtime_ns INTEGER NOT NULL,
                 message_id TEXT NOT NULL
             );
             CREATE TABLE kept_frames (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 camera TEXT NOT NULL,
                 sku TEXT NOT NULL,
                 jpeg BLOB NOT NULL,
                 captured_at_ns INTEGER NOT NULL,
                 replayed INTEGER NOT NULL,
                 retry_min_ms INTEGER NOT NULL,
                 retry_max_ms INTEGER NOT NULL,
                 kept_at_ms INTEGER NOT NULL
             );",
        )
        .map_err(open_err)?;
    }
    if version != SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(open_err)?;
        tracing::info!(path = %path.display(), from = version, to = SCHEMA_VERSION, "outbox schema migrated");
    }
    tx.commit().map_err(open_err)
}

fn load_counters(conn: &Connection) -> rusqlite::Result<Counters> {
    let (messages, bytes): (i64, i64) =
        conn.query_row("SELECT count(*), coalesce(sum(bytes), 0) FROM outbox", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(Counters {
        messages: u64::try_from(messages).unwrap_or(0),
        bytes: u64::try_from(bytes).unwrap_or(0),
        oldest_ms: oldest_ms(conn)?,
    })
}

fn oldest_ms(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT created_at_ms FROM outbox ORDER BY id LIMIT 1")?.query_row([], |r| r.get(0)).optional()
}

/// Rate-limited error log for a full outbox, so a stuck broker does not flood the journal.
#[derive(Default)]
struct Alarm {
    last: Option<Instant>,
    suppressed: u64,
}

impl Alarm {
    /// Returns the number of suppressed events since the last log when it is time to log again.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < ALARM_INTERVAL) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

struct Worker {
    conn: Connection,
    cfg: OutboxConfig,
    /// Committed state; `shared` is a copy of it for readers.
    counters: Counters,
    shared: Arc<Shared>,
    changes: watch::Sender<u64>,
    alarm: Alarm,
}

/// Result of one write inside a group transaction, delivered after the commit. The reply channel is recorded
/// before the write runs (the verdict, `None` until then, is filled in after), so a database error still reaches
/// the caller whose write triggered it.
enum Pending {
    Enqueued(oneshot::Sender<Result<Enqueued, OutboxError>>, Option<Result<Enqueued, OutboxError>>),
    Acked(oneshot::Sender<Result<(), OutboxError>>),
}

impl Worker {
    fn run(&mut self, rx: std_mpsc::Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            let mut size = first.size();
            let mut ops = vec![first];
            while size < MAX_GROUP {
                match rx.try_recv() {
                    Ok(op) => {
                        size += op.size();
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            // Reads are answered after the writes queued before them are committed, so a batch never shows a
            // message whose enqueue could still fail.
            let mut writes = Vec::new();
            for op in ops {
                match op {
                    Op::Writes(w) => writes.extend(w),
                    other => {
                        self.commit_writes(std::mem::take(&mut writes));
                        self.answer(other);
                    }
                }
            }
            self.commit_writes(writes);
        }
        tracing::debug!("outbox worker stopped");
    }

    /// Answers an operation that is not a grouped write (the caller has committed the writes queued before it). The
    /// caller may have given up waiting; nothing to undo then.
    fn answer(&mut self, op: Op) {
        match op {
            Op::Writes(w) => self.commit_writes(w),
            Op::Batch { after, limit, reply } => drop(reply.send(self.batch(after, limit))),
            // Frames come one at a time (a frame refused by a full outbox), so each is its own commit.
            Op::KeepFrame { frame, reply } => drop(reply.send(self.keep_frame(&frame))),
            Op::ReleaseFrame { id, reply } => {
                drop(reply.send(release_frames(&self.conn, &[id]).map_err(OutboxError::from)))
            }
            Op::KeptFrames { reply } => drop(reply.send(self.kept_frames())),
            Op::Covered { dir, reply } => drop(reply.send(self.covered(&dir))),
        }
    }

    fn keep_frame(&self, f: &KeptFrame) -> Result<i64, OutboxError> {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let captured_ns = i64::try_from(f.captured_at.unix_timestamp_nanos()).unwrap_or(i64::MAX);
        let id = self
            .conn
            .prepare_cached(
                "INSERT INTO kept_frames
                     (camera, sku, jpeg, captured_at_ns, replayed, retry_min_ms, retry_max_ms, kept_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
            )?
            .query_row(
                params![f.camera, f.sku, f.jpeg, captured_ns, f.replayed, ms(f.retry_min), ms(f.retry_max), now_ms()],
                |r| r.get(0),
            )?;
        Ok(id)
    }

    fn covered(&self, dir: &Path) -> Result<Vec<(CoveredFile, Uuid)>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT path, dev, ino, len, mtime_ns, message_id FROM covered_files ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            let (path, dev, ino, len): (Vec<u8>, i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            Ok((path, [dev, ino, len], r.get::<_, i64>(4)?, r.get::<_, String>(5)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (path, [dev, ino, len], mtime_ns, id) = row?;
            let path = path_from_bytes(path);
            // A record that does not decode is skipped: its file is processed again, as without a record.
            let Ok(id) = Uuid::parse_str(&id) else { continue };
            if path.parent() != Some(dir) {
                continue;
            }
            // Stored as SQLite's signed integers; the casts undo `record_covers`' (the same 64 bits).
            let version = FileVersion { dev: dev as u64, ino: ino as u64, len: len as u64, mtime_ns };
            out.push((CoveredFile { path, version }, id));
        }
        Ok(out)
    }

    fn kept_frames(&self) -> Result<Vec<(i64, KeptFrame)>, OutboxError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, camera, sku, jpeg, captured_at_ns, replayed, retry_min_ms, retry_max_ms FROM kept_frames
             ORDER BY id",
        )?;
        let ms = |v: i64| Duration::from_millis(u64::try_from(v).unwrap_or(0));
        // As in `batch`: a row that does not read is skipped (and left in place), not the end of every frame.
        let rows = stmt.query_map([], |r| {
            let frame = (|| {
                let captured_ns: i64 = r.get(4)?;
                Ok::<_, rusqlite::Error>(KeptFrame {
                    camera: r.get(1)?,
                    sku: r.get(2)?,
                    jpeg: r.get(3)?,
                    captured_at: OffsetDateTime::from_unix_timestamp_nanos(i128::from(captured_ns))
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                    replayed: r.get(5)?,
                    retry_min: ms(r.get(6)?),
                    retry_max: ms(r.get(7)?),
                })
            })();
            Ok((r.get::<_, i64>(0)?, frame))
        })?;
        let mut out = Vec::new();
        for row in rows {
            match row? {
                (id, Ok(frame)) => out.push((id, frame)),
                (id, Err(e)) => {
                    tracing::error!(id, error = %e, "undecodable kept camera frame left in place and skipped");
                }
            }
        }
        Ok(out)
    }

    fn batch(&self, after: Option<i64>, limit: usize) -> Result<Batch, OutboxError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, seq, message_id, topic, payload, qos, retain, created_at_ms FROM outbox
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        // The id is the table's integer key and always reads; any other column may not (invalid UTF-8, a value of
        // the wrong type), and that must cost one row, not every read from here on.
        let rows = stmt.query_map(params![after.unwrap_or(0), limit], |r| {
            let rest = (|| {
                Ok::<_, rusqlite::Error>((
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, bool>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })();
            Ok((r.get::<_, i64>(0)?, rest))
        })?;
        let mut out = Batch::default();
        for row in rows {
            let (id, rest) = row?;
            out.rows += 1;
            out.last_id = Some(id);
            let decoded =
                rest.map_err(|e| e.to_string()).and_then(|(seq, message_id, topic, payload, qos, retain, ms)| {
                    let message_id = Uuid::parse_str(&message_id).map_err(|e| format!("message_id: {e}"))?;
                    let payload = serde_json::from_str(&payload).map_err(|e| format!("payload: {e}"))?;
                    Ok(Entry {
                        id,
                        seq: u64::try_from(seq).unwrap_or(0),
                        message_id,
                        topic,
                        payload,
                        qos: u8::try_from(qos).unwrap_or(1),
                        retain,
                        created_at: OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                            .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                    })
                });
            match decoded {
                Ok(entry) => out.entries.push(entry),
                // Left in the table (and in `depth`) for an operator to inspect; skipping it keeps every later
                // result flowing.
                Err(error) => tracing::error!(id, error, "undecodable outbox row left in place and skipped"),
            }
        }
        Ok(out)
    }

    /// Applies all writes in one transaction and answers each caller after the commit (or with the error).
    fn commit_writes(&mut self, writes: Vec<Write>) {
        if writes.is_empty() {
            return;
        }
        let mut counters = self.counters;
        let mut pending = Vec::with_capacity(writes.len());
        let mut enqueued = 0u64;
        let mut covered = 0usize;
        let mut rest = writes.into_iter();
        let outcome = (|| -> Result<(), rusqlite::Error> {
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut next_seq: i64 = tx.query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| r.get(0))?;
            let mut deleted_any = false;
            for op in rest.by_ref() {
                match op {
                    Write::Enqueue { topic, payload, qos, retain, message_id, covers, releases, reply } => {
                        pending.push(Pending::Enqueued(reply, None));
                        let r = insert(
                            &tx,
                            &self.cfg,
                            &mut self.alarm,
                            &mut counters,
                            &mut next_seq,
                            topic,
                            payload,
                            qos,
                            retain,
                            message_id,
                        )?;
                        deleted_any |= r.as_ref().is_ok_and(|e| e.dropped > 0);
                        enqueued += u64::from(r.is_ok());
                        if r.is_ok() {
                            covered += record_covers(&tx, &covers, message_id)?;
                            release_frames(&tx, &releases)?;
                        }
                        if let Some(Pending::Enqueued(_, verdict)) = pending.last_mut() {
                            *verdict = Some(r);
                        }
                    }
                    Write::Ack { id, reply } => {
                        pending.push(Pending::Acked(reply));
                        let bytes: Option<i64> = tx
                            .prepare_cached("DELETE FROM outbox WHERE id = ?1 RETURNING bytes")?
                            .query_row([id], |r| r.get(0))
                            .optional()?;
                        if let Some(b) = bytes {
                            counters.messages = counters.messages.saturating_sub(1);
                            counters.bytes = counters.bytes.saturating_sub(u64::try_from(b).unwrap_or(0));
                            deleted_any = true;
                        }
                    }
                }
            }
            tx.execute("UPDATE meta SET value = ?1 WHERE key = 'next_seq'", [next_seq])?;
            if covered > 0 {
                tx.prepare_cached("DELETE FROM covered_files WHERE id <= (SELECT max(id) FROM covered_files) - ?1")?
                    .execute([COVERED_FILES_KEPT])?;
            }
            if deleted_any || counters.oldest_ms.is_none() {
                counters.oldest_ms = oldest_ms(&tx)?;
            }
            tx.commit()
        })();

        match outcome {
            Ok(()) => {
                self.counters = counters;
                *self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner) = counters;
                if enqueued > 0 {
                    self.changes.send_modify(|n| *n = n.wrapping_add(enqueued));
                }
                for p in pending {
                    // A caller that stopped waiting loses only the reply, not the committed write.
                    match p {
                        Pending::Enqueued(reply, verdict) => {
                            // Every write of a committed group has its verdict; `Closed` is only a fallback.
                            let _ = reply.send(verdict.unwrap_or(Err(OutboxError::Closed)));
                        }
                        Pending::Acked(reply) => {
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            Err(e) => {
                // The transaction rolled back when it was dropped; every caller of this group gets the error and
                // the next group starts from the last committed state, so the outbox recovers once space returns.
                let e = Arc::new(e);
                tracing::error!(error = %e, ops = pending.len() + rest.len(), "outbox transaction failed; nothing of it was committed");
                let never_ran = rest.map(|w| match w {
                    Write::Enqueue { reply, .. } => Pending::Enqueued(reply, None),
                    Write::Ack { reply, .. } => Pending::Acked(reply),
                });
                for p in pending.into_iter().chain(never_ran) {
                    match p {
                        Pending::Enqueued(reply, _) => {
                            let _ = reply.send(Err(OutboxError::Sqlite(e.clone())));
                        }
                        Pending::Acked(reply) => {
                            let _ = reply.send(Err(OutboxError::Sqlite(e.clone())));
                        }
                    }
                }
            }
        }
    }
}

/// Records the files a stored message covers, inside its transaction; how many.
fn record_covers(tx: &rusqlite::Transaction<'_>, covers: &[CoveredFile], message_id: Uuid) -> rusqlite::Result<usize> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO covered_files (path, dev, ino, len, mtime_ns, message_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for c in covers {
        let v = c.version;
        // SQLite integers are signed 64-bit: the u64 fields are stored bit for bit and read back the same way.
        stmt.execute(params![
            path_bytes(&c.path),
            v.dev as i64,
            v.ino as i64,
            v.len as i64,
            v.mtime_ns,
            message_id.to_string()
        ])?;
    }
    Ok(covers.len())
}

/// Deletes kept frames (inside the caller's transaction, or on their own); unknown keys are fine.
fn release_frames(conn: &Connection, ids: &[i64]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached("DELETE FROM kept_frames WHERE id = ?1")?;
    for id in ids {
        stmt.execute([id])?;
    }
    Ok(())
}

/// A path's bytes as the OS has them (Unix paths need not be UTF-8).
fn path_bytes(p: &Path) -> Vec<u8> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        p.as_os_str().as_bytes().to_vec()
    }
    #[cfg(not(unix))]
    {
        p.to_string_lossy().into_owned().into_bytes()
    }
}

fn path_from_bytes(b: Vec<u8>) -> PathBuf {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        PathBuf::from(std::ffi::OsString::from_vec(b))
    }
    #[cfg(not(unix))]
    {
        PathBuf::from(String::from_utf8_lossy(&b).into_owned())
    }
}

/// Inserts one message inside the group transaction. The outer `Result` is a database failure (aborting the
/// group); the inner one is this message's own verdict. `Enqueued::dropped` counts the older rows deleted for it.
#[allow(clippy::too_many_arguments)]
fn insert(
    tx: &rusqlite::Transaction<'_>,
    cfg: &OutboxConfig,
    alarm: &mut Alarm,
    counters: &mut Counters,
    next_seq: &mut i64,
    topic: String,
    mut payload: serde_json::Map<String, serde_json::Value>,
    qos: u8,
    retain: bool,
    message_id: Uuid,
) -> Result<Result<Enqueued, OutboxError>, rusqlite::Error> {
    let waiting: Option<(i64, i64)> = tx
        .prepare_cached("SELECT id, seq FROM outbox WHERE message_id = ?1")?
        .query_row([message_id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((id, seq)) = waiting {
        return Ok(Ok(Enqueued { id, seq: u64::try_from(seq).unwrap_or(0), message_id, dropped: 0 }));
    }
    let seq = *next_seq;
    payload.insert("seq".into(), seq.into());
    payload.insert("message_id".into(), message_id.to_string().into());
    let text = serde_json::Value::Object(payload).to_string();
    let size = text.len() as u64;

    if size > cfg.max_bytes {
        return Ok(Err(OutboxError::TooLarge { bytes: size, max_bytes: cfg.max_bytes }));
    }
    let fits = |c: &Counters| c.messages < cfg.max_messages && c.bytes + size <= cfg.max_bytes;
    let mut dropped = 0u64;
    if !fits(counters) {
        match cfg.when_full {
            FullPolicy::RejectNew => {
                if let Some(suppressed) = alarm.due() {
                    tracing::error!(
                        messages = counters.messages,
                        bytes = counters.bytes,
                        max_messages = cfg.max_messages,
                        max_bytes = cfg.max_bytes,
                        suppressed,
                        "ALARM outbox full: rejecting new results (policy reject_new); sources keep their files and \
                         retry. Is the MQTT broker reachable?"
                    );
                }
                return Ok(Err(OutboxError::Full { messages: counters.messages, bytes: counters.bytes }));
            }
            FullPolicy::DropOldest => {
                let mut oldest = tx.prepare_cached("SELECT id, bytes FROM outbox ORDER BY id LIMIT 64")?;
                let mut delete = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
                while !fits(counters) {
                    let rows: Vec<(i64, i64)> =
                        oldest.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
                    if rows.is_empty() {
                        break;
                    }
                    for (id, b) in rows {
                        if fits(counters) {
                            break;
                        }
                        delete.execute([id])?;
                        counters.messages = counters.messages.saturating_sub(1);
                        counters.bytes = counters.bytes.saturating_sub(u64::try_from(b).unwrap_or(0));
                        dropped += 1;
                    }
                }
                if let Some(suppressed) = alarm.due() {
                    tracing::error!(
                        dropped,
                        suppressed,
                        max_messages = cfg.max_messages,
                        max_bytes = cfg.max_bytes,
                        "ALARM outbox full: dropped the oldest unpublished results (policy drop_oldest)"
                    );
                }
            }
        }
    }

    let created = now_ms();
    let id = tx
        .prepare_cached(
            "INSERT INTO outbox (seq, message_id, topic, payload, qos, retain, created_at_ms, bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
        )?
        .query_row(params![seq, message_id.to_string(), topic, text, qos, retain, created, size as i64], |r| {
            r.get::<_, i64>(0)
        })?;
    *next_seq += 1;
    counters.messages += 1;
    counters.bytes += size;
    if counters.oldest_ms.is_none() {
        counters.oldest_ms = Some(created);
    }
    Ok(Ok(Enqueued { id, seq: u64::try_from(seq).unwrap_or(0), message_id, dropped }))
}
