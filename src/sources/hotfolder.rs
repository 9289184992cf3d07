//! Hot folder: photos written or copied into a directory.
//!
//! A file is taken once it is fully written: on a close-after-write or rename-into event (inotify), or else once
//! its size and modification time have not changed for `settle`. Files already there at start-up are processed
//! too, and a periodic rescan catches anything the watcher missed (event queue overflow, a watcher that could not
//! be set up). A file leaves the folder only after the pipeline says what became of it: `done/` once its result is
//! durable, `failed/` with a `<name>.error.txt` when it can never produce one; "retry later" keeps it in place and
//! tries again after a backoff. A missing or recreated directory is reported and watched again when it is back.
//! A file a crash left behind after its result was stored (the outbox recorded it with the result) is filed to
//! `done/` at the next start without being processed again.
//!
//! The watcher runs on its own thread: everything it does is blocking file-system work, and a thread keeps that off
//! the async runtime without shuttling state in and out of `spawn_blocking`.

use super::{Origin, Shot, ShotOutcome, Shutdown, Source, SourceError, SourceFuture, backoff};
use crate::outbox::{FileVersion, Outbox};
use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

/// Configuration of one hot folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HotfolderConfig {
    /// Directory to watch (its direct children only). Default `/var/lib/attrd/hotfolder`.
    pub dir: PathBuf,
    /// Name in logs and metrics; default `hotfolder:<dir>`. Must be unique among sources.
    pub name: Option<String>,
    /// Where files go once their result is durable; default `<dir>/done`.
    pub done_dir: Option<PathBuf>,
    /// Where files go that can never produce a result, each with a `<name>.error.txt`; default `<dir>/failed`.
    pub failed_dir: Option<PathBuf>,
    /// File extensions to take, case-insensitive, without the dot. Default `jpg`, `jpeg`, `png`, `webp`. Dotfiles are
    /// always ignored, and so are partial downloads (`.part`, `.tmp`, …) unless listed here.
    pub extensions: Vec<String>,
    /// Regular expression applied to the file name; its named group `sku` is the SKU. Default `^(?P<sku>[^_.]+)`,
    /// so `SKU123_front.jpg` is SKU `SKU123`. A name that does not match goes to `failed/`, and so does one whose SKU
    /// cannot name a result topic (over 128 bytes, containing `/`, `+`, `#` or a control character, or starting with
    /// `$`; see docs/mqtt.md).
    pub sku_pattern: String,
    /// How long size and modification time must stay unchanged before a file counts as written, when no
    /// close-after-write event was seen (files present at start-up, file systems without inotify). Default 1s.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// Full rescan of the directory this often, for events the watcher missed. Default 10s.
    #[serde(with = "humantime_serde")]
    pub rescan: Duration,
    /// First wait before a file whose result could not be stored is tried again; doubles per attempt. Default 1s.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest wait between retries (of a file, of a missing directory, of a failed move). Default 60s.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Larger files go to `failed/` without being read. Default 64 MiB.
    pub max_file_bytes: u64,
}

impl Default for HotfolderConfig {
    fn default() -> Self {
        HotfolderConfig {
            dir: PathBuf::from("/var/lib/attrd/hotfolder"),
            name: None,
            done_dir: None,
            failed_dir: None,
            extensions: ["jpg", "jpeg", "png", "webp"].map(String::from).to_vec(),
            sku_pattern: DEFAULT_SKU_PATTERN.to_string(),
            settle: Duration::from_secs(1),
            rescan: Duration::from_secs(10),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            max_file_bytes: 64 * 1024 * 1024,
        }
    }
}

/// `SKU123_front.jpg` → `SKU123`.
pub const DEFAULT_SKU_PATTERN: &str = r"^(?P<sku>[^_.]+)";

impl HotfolderConfig {
    pub fn source_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| format!("hotfolder:{}", self.dir.display()))
    }

    pub fn done_dir(&self) -> PathBuf {
        self.done_dir.clone().unwrap_or_else(|| self.dir.join("done"))
    }

    pub fn failed_dir(&self) -> PathBuf {
        self.failed_dir.clone().unwrap_or_else(|| self.dir.join("failed"))
    }
}

/// Reads the SKU from file names.
#[derive(Debug, Clone)]
pub struct SkuPattern(Regex);

impl SkuPattern {
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        let re = Regex::new(pattern)?;
        if !re.capture_names().any(|n| n == Some("sku")) {
            return Err(regex::Error::Syntax(format!("{pattern:?} has no named group `sku`, as in (?P<sku>...)")));
        }
        Ok(SkuPattern(re))
    }

    /// The SKU in `file_name`, if the pattern matches and the group is not empty.
    pub fn sku(&self, file_name: &str) -> Option<String> {
        let m = self.0.captures(file_name)?.name("sku")?;
        (!m.as_str().is_empty()).then(|| m.as_str().to_string())
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

/// A hot-folder source; see the module docs.
#[derive(Debug)]
pub struct HotfolderSource {
    cfg: HotfolderConfig,
    name: String,
    pattern: SkuPattern,
    extensions: Vec<String>,
    outbox: Option<Outbox>,
}

impl HotfolderSource {
    pub fn new(cfg: HotfolderConfig) -> Result<Self, SourceError> {
        let name = cfg.source_name();
        let pattern = SkuPattern::new(&cfg.sku_pattern).map_err(|e| SourceError::BadPattern {
            source_name: name.clone(),
            pattern: cfg.sku_pattern.clone(),
            source: Box::new(e),
        })?;
        let bad = |reason: &str| Err(SourceError::Config { source_name: name.clone(), reason: reason.to_string() });
        if cfg.dir.as_os_str().is_empty() {
            return bad("dir is empty");
        }
        if cfg.extensions.is_empty() {
            return bad("extensions is empty: no file would ever be taken");
        }
        if cfg.retry_min.is_zero() || cfg.retry_max < cfg.retry_min {
            return bad("retry_min must be positive and at most retry_max");
        }
        if cfg.rescan.is_zero() || cfg.max_file_bytes == 0 {
            return bad("rescan and max_file_bytes must be positive");
        }
        let extensions =
            cfg.extensions.iter().map(|e| e.trim_start_matches('.').to_ascii_lowercase()).collect::<Vec<_>>();
        Ok(HotfolderSource { cfg, name, pattern, extensions, outbox: None })
    }

    /// The file extensions it takes, lower case, without the dot.
    pub fn extensions(&self) -> &[String] {
        &self.extensions
    }

    /// At start-up, files whose results the outbox already stores (a crash came between the result's commit and the
    /// file's move, see [`Outbox::covered_files_blocking`]) are filed to `done/` instead of being processed again:
    /// a photo fused with others would otherwise produce a second result, with another `message_id`.
    pub fn with_outbox(mut self, outbox: Outbox) -> Self {
        self.outbox = Some(outbox);
        self
    }
}

impl Source for HotfolderSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(self: Box<Self>, tx: mpsc::Sender<Shot>, shutdown: Shutdown) -> SourceFuture {
        let (ended_tx, ended_rx) = oneshot::channel::<()>();
        let name = self.name.clone();
        let spawned = std::thread::Builder::new().name("hotfolder".into()).spawn(move || {
            Folder::new(*self, tx, shutdown).run();
            let _ = ended_tx.send(());
        });
        Box::pin(async move {
            match spawned {
                // The thread always answers unless it panicked; either way it is over.
                Ok(_) => {
                    if ended_rx.await.is_err() {
                        tracing::error!(source = %name, "hot-folder thread panicked");
                    }
                }
                Err(e) => tracing::error!(source = %name, error = %e, "cannot start the hot-folder thread"),
            }
        })
    }
}

/// Where a finished file goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    Done,
    Failed,
}

#[derive(Debug)]
enum State {
    /// Seen; waiting until it is fully written.
    Settling { size: u64, mtime: Option<SystemTime>, since: Instant, closed: bool },
    /// Fully written; sent as soon as the pipeline has room, in name order.
    Ready,
    /// In the pipeline; the receiver tells what became of it.
    InFlight(oneshot::Receiver<ShotOutcome>),
    /// "Retry later" was answered; ready again at `until`.
    Backoff { until: Instant },
    /// The outcome is known but the move failed; the move (not the shot) is retried at `until`.
    Moving { until: Instant, dest: Dest, reason: Option<String> },
}

#[derive(Debug)]
struct Entry {
    state: State,
    /// Failed tries so far (retry-later answers, failed moves), for the backoff.
    attempts: u32,
    /// What the file looked like when it was read for the shot whose outcome is awaited or being acted on: if it
    /// looks different when that outcome arrives, the photo was replaced meanwhile, and the new one has not been
    /// processed.
    read_as: Option<Stamp>,
}

/// A file's identity and version: inode, length and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    id: Option<(u64, u64)>,
    len: u64,
    mtime: Option<SystemTime>,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Stamp { id: file_id(meta), len: meta.len(), mtime: meta.modified().ok() }
    }

    /// As the outbox records it; `None` without an inode or a modification time.
    fn version(&self) -> Option<FileVersion> {
        let (dev, ino) = self.id?;
        let mtime_ns = match self.mtime?.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).ok()?,
            Err(before) => -i64::try_from(before.duration().as_nanos()).ok()?,
        };
        Some(FileVersion { dev, ino, len: self.len, mtime_ns })
    }
}

/// A photo's capture time: its file's modification time, or now when there is none or `time` cannot represent it.
/// File systems with 64-bit timestamps (tmpfs, btrfs, some shares) hold times beyond the years ±9999, where
/// `OffsetDateTime::from(SystemTime)` panics, and a panic here would stop the folder for good.
fn capture_time(mtime: Option<SystemTime>) -> OffsetDateTime {
    let at = |t: SystemTime| match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => OffsetDateTime::UNIX_EPOCH.checked_add(time::Duration::try_from(after).ok()?),
        Err(before) => OffsetDateTime::UNIX_EPOCH.checked_sub(time::Duration::try_from(before.duration()).ok()?),
    };
    mtime.and_then(at).unwrap_or_else(OffsetDateTime::now_utc)
}

struct WatchHandle {
    _watcher: notify::RecommendedWatcher,
    /// Identity of the directory when the watch was set up: a directory deleted and recreated between two looks has
    /// another inode, and its old watch is dead.
    dir_id: Option<(u64, u64)>,
}

const EVENT_QUEUE: usize = 4096;

struct Folder {
    src: HotfolderSource,
    tx: Option<mpsc::Sender<Shot>>,
    shutdown: Shutdown,
    files: BTreeMap<PathBuf, Entry>,
    events: std_mpsc::Receiver<notify::Result<notify::Event>>,
    events_tx: std_mpsc::SyncSender<notify::Result<notify::Event>>,
    overflow: Arc<AtomicBool>,
    watch: Option<WatchHandle>,
    watch_attempts: u32,
    next_watch_try: Instant,
    dir_missing_reported: bool,
    next_rescan: Instant,
    next_dir_check: Instant,
    tick: Duration,
    /// Files results were stored for by an earlier process, by path (see [`HotfolderSource::with_outbox`]);
    /// consulted once per path, at the file's first dispatch.
    stored: std::collections::HashMap<PathBuf, Vec<(FileVersion, uuid::Uuid)>>,
}

impl Folder {
    fn new(src: HotfolderSource, tx: mpsc::Sender<Shot>, shutdown: Shutdown) -> Self {
        let (events_tx, events) = std_mpsc::sync_channel(EVENT_QUEUE);
        // Poll often enough to notice a settled file within about a fifth of `settle`, but not busily.
        let tick = (src.cfg.settle / 5).clamp(Duration::from_millis(10), Duration::from_millis(100));
        let now = Instant::now();
        Folder {
            src,
            tx: Some(tx),
            shutdown,
            files: BTreeMap::new(),
            events,
            events_tx,
            overflow: Arc::new(AtomicBool::new(false)),
            watch: None,
            watch_attempts: 0,
            next_watch_try: now,
            dir_missing_reported: false,
            next_rescan: now,
            next_dir_check: now,
            tick,
            stored: Default::default(),
        }
    }

    fn name(&self) -> &str {
        &self.src.name
    }

    fn dir(&self) -> &Path {
        &self.src.cfg.dir
    }

    fn run(mut self) {
        tracing::info!(source = %self.name(), dir = %self.dir().display(), "watching hot folder");
        if let Some(outbox) = &self.src.outbox {
            match outbox.covered_files_blocking(&self.src.cfg.dir) {
                Ok(records) => {
                    for (file, message_id) in records {
                        self.stored.entry(file.path).or_default().push((file.version, message_id));
                    }
                }
                // Without the records a file a crash left behind is processed again, as it was before they existed.
                Err(e) => tracing::error!(source = %self.name(), error = %super::error_chain(&e),
                    "cannot read which files the outbox's results cover; files left by a crash are processed again"),
            }
        }
        loop {
            if self.tx.is_some() && self.shutdown.is_triggered() {
                // Stop taking new files; in-flight ones are still finished so their files get moved.
                self.tx = None;
                tracing::info!(source = %self.name(), in_flight = self.in_flight(), "hot folder stopping");
            }
            if self.tx.is_none() && self.in_flight() == 0 {
                break;
            }
            let now = Instant::now();
            if self.tx.is_some() {
                self.ensure_watch(now);
                if self.overflow.swap(false, Ordering::Relaxed) {
                    tracing::warn!(source = %self.name(), "watcher event queue overflowed; rescanning");
                    self.next_rescan = now;
                }
                if now >= self.next_rescan && self.watch.is_some() {
                    self.rescan();
                    self.next_rescan = now + self.src.cfg.rescan;
                }
                self.check_settling(now);
            }
            self.poll_outcomes(now);
            self.timers(now);
            if self.tx.is_some() {
                self.dispatch();
            }
            match self.events.recv_timeout(self.tick) {
                Ok(ev) => {
                    self.on_event(ev);
                    while let Ok(ev) = self.events.try_recv() {
                        self.on_event(ev);
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                // Invariant: `self.events_tx` keeps the channel open for as long as `self` lives.
                Err(std_mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(self.tick),
            }
        }
        for (path, e) in &self.files {
            if let State::Moving { dest, .. } = &e.state {
                tracing::error!(
                    source = %self.name(), path = %path.display(), ?dest,
                    "stopping with a file that could not be moved; it will be taken again at the next start"
                );
            }
        }
        tracing::info!(source = %self.name(), "hot folder stopped");
    }

    /// Shots whose outcome is still awaited. (Files whose move keeps failing are not waited for at shutdown: they stay
    /// in the folder and are taken again at the next start.)
    fn in_flight(&self) -> usize {
        self.files.values().filter(|e| matches!(e.state, State::InFlight(_))).count()
    }

    /// Sets the watch up when there is none, and notices a directory that vanished or was replaced.
    fn ensure_watch(&mut self, now: Instant) {
        if self.watch.is_some() && now >= self.next_dir_check {
            self.next_dir_check = now + Duration::from_secs(1);
            let current = dir_id(self.dir());
            let lost = match (&current, &self.watch) {
                (Err(_), _) => true,
                (Ok(id), Some(w)) => w.dir_id.is_some() && *id != w.dir_id,
                _ => false,
            };
            if lost {
                tracing::warn!(source = %self.name(), dir = %self.dir().display(), "hot folder was removed or replaced");
                self.watch = None;
                self.next_watch_try = now;
            }
        }
        if self.watch.is_some() || now < self.next_watch_try {
            return;
        }
        match self.start_watch() {
            Ok(w) => {
                if self.dir_missing_reported || self.watch_attempts > 0 {
                    tracing::info!(source = %self.name(), dir = %self.dir().display(), "hot folder is back");
                }
                self.watch = Some(w);
                self.watch_attempts = 0;
                self.dir_missing_reported = false;
                self.next_rescan = now;
            }
            Err(e) => {
                let wait = backoff(Duration::from_millis(200), self.src.cfg.retry_max, self.watch_attempts);
                if !self.dir_missing_reported {
                    tracing::error!(
                        source = %self.name(), dir = %self.dir().display(), error = %e, retry_in = ?wait,
                        "cannot watch the hot folder; retrying"
                    );
                    self.dir_missing_reported = true;
                }
                self.watch_attempts = self.watch_attempts.saturating_add(1);
                self.next_watch_try = now + wait;
            }
        }
    }

    fn start_watch(&self) -> Result<WatchHandle, notify::Error> {
        let meta = std::fs::metadata(self.dir()).map_err(notify::Error::io)?;
        if !meta.is_dir() {
            return Err(notify::Error::generic("not a directory"));
        }
        let id = dir_id(self.dir()).ok().flatten();
        let tx = self.events_tx.clone();
        let overflow = self.overflow.clone();
        let mut watcher = notify::recommended_watcher(move |ev| {
            // Never block the watcher's thread: a full queue only means a rescan is needed.
            if let Err(std_mpsc::TrySendError::Full(_)) = tx.try_send(ev) {
                overflow.store(true, Ordering::Relaxed);
            }
        })?;
        watcher.watch(self.dir(), RecursiveMode::NonRecursive)?;
        Ok(WatchHandle { _watcher: watcher, dir_id: id })
    }

    fn eligible(&self, path: &Path) -> bool {
        if path.parent() != Some(self.dir()) {
            return false;
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return false;
        };
        if name.starts_with('.') {
            return false;
        }
        let ext = Path::new(name).extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        ext.is_some_and(|e| self.src.extensions.contains(&e))
    }

    fn rescan(&mut self) {
        let entries = match std::fs::read_dir(self.dir()) {
            Ok(rd) => rd,
            Err(e) => {
                tracing::warn!(source = %self.name(), dir = %self.dir().display(), error = %e, "cannot list the hot folder");
                self.watch = None;
                self.next_watch_try = Instant::now();
                return;
            }
        };
        let now = Instant::now();
        let mut seen = std::collections::BTreeSet::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if !self.eligible(&path) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if !meta.is_file() {
                continue;
            }
            seen.insert(path.clone());
            self.files.entry(path).or_insert_with(|| Entry {
                state: State::Settling { size: meta.len(), mtime: meta.modified().ok(), since: now, closed: false },
                attempts: 0,
                read_as: None,
            });
        }
        // Files someone else took away while they waited.
        self.files.retain(|p, e| seen.contains(p) || matches!(e.state, State::InFlight(_) | State::Moving { .. }));
    }

    fn on_event(&mut self, ev: notify::Result<notify::Event>) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(source = %self.name(), error = %e, "watcher error; rescanning");
                self.next_rescan = Instant::now();
                return;
            }
        };
        if ev.need_rescan() {
            self.next_rescan = Instant::now();
        }
        let now = Instant::now();
        for path in &ev.paths {
            if path == self.dir() {
                if matches!(ev.kind, EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))) {
                    tracing::warn!(source = %self.name(), dir = %self.dir().display(), "hot folder was removed or moved");
                    self.watch = None;
                    self.next_watch_try = now;
                }
                continue;
            }
            if !self.eligible(path) {
                continue;
            }
            match ev.kind {
                EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                    if matches!(self.files.get(path), Some(e) if matches!(e.state, State::Settling { .. } | State::Ready | State::Backoff { .. }))
                    {
                        self.files.remove(path);
                    }
                }
                // The other half of a rename arrives as its own `To` event.
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {}
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Any)) => {
                    // Complete now: the writer closed it, or it was renamed in whole. Record what it looks like now,
                    // so that the settle check only waits if it changes again.
                    let Ok(meta) = std::fs::symlink_metadata(path) else { continue };
                    if !meta.is_file() {
                        continue;
                    }
                    let e = self.files.entry(path.clone()).or_insert(Entry {
                        state: State::Settling { size: 0, mtime: None, since: now, closed: false },
                        attempts: 0,
                        read_as: None,
                    });
                    if matches!(e.state, State::Settling { .. } | State::Ready) {
                        e.state =
                            State::Settling { size: meta.len(), mtime: meta.modified().ok(), since: now, closed: true };
                    }
                }
                EventKind::Create(CreateKind::File | CreateKind::Any) | EventKind::Modify(_) | EventKind::Any => {
                    let e = self.files.entry(path.clone()).or_insert(Entry {
                        state: State::Settling { size: 0, mtime: None, since: now, closed: false },
                        attempts: 0,
                        read_as: None,
                    });
                    match &mut e.state {
                        State::Settling { since, closed, .. } => {
                            *since = now;
                            *closed = false;
                        }
                        // Written to again after it looked finished: wait for it to settle anew.
                        State::Ready => {
                            e.state = State::Settling { size: 0, mtime: None, since: now, closed: false };
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }

    /// Promotes settled files to ready.
    fn check_settling(&mut self, now: Instant) {
        let settle = self.src.cfg.settle;
        let mut gone = Vec::new();
        for (path, e) in self.files.iter_mut() {
            let State::Settling { size, mtime, since, closed } = &mut e.state else { continue };
            let meta = match std::fs::symlink_metadata(path) {
                Ok(m) if m.is_file() => m,
                _ => {
                    gone.push(path.clone());
                    continue;
                }
            };
            let (s, m) = (meta.len(), meta.modified().ok());
            if (s, m) != (*size, *mtime) {
                (*size, *mtime, *since, *closed) = (s, m, now, false);
                continue;
            }
            // An empty file may still be about to be written, close event or not: only settling makes it final.
            if (*closed && s > 0) || now.duration_since(*since) >= settle {
                e.state = State::Ready;
            }
        }
        for p in gone {
            self.files.remove(&p);
        }
    }

    fn poll_outcomes(&mut self, now: Instant) {
        let mut finished = Vec::new();
        for (path, e) in self.files.iter_mut() {
            let State::InFlight(rx) = &mut e.state else { continue };
            let outcome = match rx.try_recv() {
                Ok(o) => o,
                Err(oneshot::error::TryRecvError::Empty) => continue,
                Err(oneshot::error::TryRecvError::Closed) => {
                    ShotOutcome::RetryLater("the pipeline stopped before answering".into())
                }
            };
            finished.push((path.clone(), outcome));
        }
        for (path, outcome) in finished {
            match outcome {
                ShotOutcome::Durable => self.finish(&path, Dest::Done, None),
                ShotOutcome::Failed(reason) => self.finish(&path, Dest::Failed, Some(reason)),
                ShotOutcome::RetryLater(reason) => {
                    let Some(e) = self.files.get_mut(&path) else { continue };
                    let wait = backoff(self.src.cfg.retry_min, self.src.cfg.retry_max, e.attempts);
                    e.attempts = e.attempts.saturating_add(1);
                    e.state = State::Backoff { until: now + wait };
                    tracing::warn!(
                        source = %self.src.name, path = %path.display(), %reason, retry_in = ?wait,
                        "no durable result yet; the file stays and is tried again"
                    );
                }
            }
        }
    }

    fn timers(&mut self, now: Instant) {
        let mut moves = Vec::new();
        for (path, e) in self.files.iter_mut() {
            match &e.state {
                State::Backoff { until } if now >= *until => e.state = State::Ready,
                State::Moving { until, dest, reason } if now >= *until => {
                    moves.push((path.clone(), *dest, reason.clone()))
                }
                _ => {}
            }
        }
        for (path, dest, reason) in moves {
            self.finish(&path, dest, reason);
        }
    }

    /// A file found replaced when its predecessor's outcome came: it goes through the pipeline as a new photo.
    fn replaced(&mut self, path: &Path) {
        let Some(entry) = self.files.get_mut(path) else { return };
        tracing::info!(
            source = %self.src.name, path = %path.display(),
            "the file was replaced while it was processed; the new version is processed too"
        );
        entry.read_as = None;
        entry.state = State::Settling { size: 0, mtime: None, since: Instant::now(), closed: false };
    }

    /// Moves a file whose outcome is known out of the folder; a failed move is retried, never the shot.
    fn finish(&mut self, path: &Path, dest: Dest, reason: Option<String>) {
        if let Some(entry) = self.files.get_mut(path)
            && let Some(read_as) = entry.read_as
            && let Ok(now) = std::fs::metadata(path)
            && Stamp::of(&now) != read_as
        {
            // Replaced (rewritten, or another file renamed over it) while its predecessor was processed: moving it
            // now would file a photo that never produced a result. The outcome belongs to the old photo, whose
            // result, if any, is stored; the new one is processed in its turn.
            self.replaced(path);
            return;
        }
        let dir = match dest {
            Dest::Done => self.src.cfg.done_dir(),
            Dest::Failed => self.src.cfg.failed_dir(),
        };
        let read_as = self.files.get(path).and_then(|e| e.read_as);
        match move_checked(path, &dir, read_as) {
            Ok(to) => {
                self.files.remove(path);
                match &reason {
                    None => tracing::info!(source = %self.src.name, from = %path.display(), to = %to.display(), "done"),
                    Some(r) => {
                        tracing::warn!(source = %self.src.name, from = %path.display(), to = %to.display(), reason = %r, "failed");
                        let txt = error_file(&to);
                        if let Err(e) = std::fs::write(&txt, format!("{r}\n")) {
                            tracing::error!(path = %txt.display(), error = %e, "cannot write the error file");
                        }
                    }
                }
            }
            // The same, found by a move across file systems, which checks again on the file it copies.
            Err(e) if e.get_ref().is_some_and(|inner| inner.is::<Replaced>()) => self.replaced(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !path.exists() => {
                tracing::warn!(source = %self.src.name, path = %path.display(), "file vanished before it could be moved");
                self.files.remove(path);
            }
            Err(e) => {
                let Some(entry) = self.files.get_mut(path) else { return };
                let wait = backoff(self.src.cfg.retry_min, self.src.cfg.retry_max, entry.attempts);
                entry.attempts = entry.attempts.saturating_add(1);
                tracing::error!(
                    source = %self.src.name, path = %path.display(), to = %dir.display(), error = %e, retry_in = ?wait,
                    "cannot move the file; retrying the move"
                );
                entry.state = State::Moving { until: Instant::now() + wait, dest, reason };
            }
        }
    }

    /// Sends ready files, in name order, for as long as the pipeline has room.
    fn dispatch(&mut self) {
        let ready: Vec<PathBuf> =
            self.files.iter().filter(|(_, e)| matches!(e.state, State::Ready)).map(|(p, _)| p.clone()).collect();
        for path in ready {
            let Some(tx) = self.tx.clone() else { return };
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let Some(sku) = self.src.pattern.sku(name) else {
                let reason = format!(
                    "cannot read a SKU from the file name {name:?} (sku_pattern {:?})",
                    self.src.pattern.as_str()
                );
                self.finish(&path, Dest::Failed, Some(reason));
                continue;
            };
            // Checked before the photo is read: its result could never be published, so processing it is waste and
            // retrying it would never end.
            if let Err(e) = crate::mqtt::topics::check_sku(&sku) {
                let reason = format!("the file name {name:?} gives a SKU that cannot name a result topic: {e}");
                self.finish(&path, Dest::Failed, Some(reason));
                continue;
            }
            if let Some(records) = self.stored.remove(&path)
                && let Some(message_id) = self.stored_result(&path, &records)
            {
                tracing::info!(source = %self.src.name, path = %path.display(), %message_id,
                    "the file's result was stored before the restart; filing it without processing it again");
                self.finish(&path, Dest::Done, None);
                continue;
            }
            let permit = match tx.try_reserve() {
                Ok(p) => p,
                Err(mpsc::error::TrySendError::Full(())) => return,
                Err(mpsc::error::TrySendError::Closed(())) => {
                    tracing::error!(source = %self.src.name, "the pipeline is gone; hot folder stops taking files");
                    self.tx = None;
                    return;
                }
            };
            match read_file(&path, self.src.cfg.max_file_bytes) {
                Ok(ReadOutcome::Whole { bytes, stamp }) => {
                    let captured_at = capture_time(stamp.mtime);
                    let (shot, rx) = Shot::new(
                        sku.clone(),
                        bytes,
                        captured_at,
                        Origin::Hotfolder {
                            source: self.src.name.clone(),
                            path: path.clone(),
                            version: stamp.version(),
                        },
                    );
                    tracing::debug!(source = %self.src.name, path = %path.display(), %sku, "file sent");
                    permit.send(shot);
                    if let Some(e) = self.files.get_mut(&path) {
                        e.state = State::InFlight(rx);
                        e.read_as = Some(stamp);
                    }
                }
                Ok(ReadOutcome::Changing) => {
                    if let Some(e) = self.files.get_mut(&path) {
                        e.state = State::Settling { size: 0, mtime: None, since: Instant::now(), closed: false };
                    }
                }
                Ok(ReadOutcome::TooLarge(n)) => {
                    let limit = self.src.cfg.max_file_bytes;
                    self.finish(
                        &path,
                        Dest::Failed,
                        Some(format!("file is {n} bytes, more than max_file_bytes {limit}")),
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.files.remove(&path);
                }
                Err(e) => {
                    let Some(entry) = self.files.get_mut(&path) else { continue };
                    let wait = backoff(self.src.cfg.retry_min, self.src.cfg.retry_max, entry.attempts);
                    entry.attempts = entry.attempts.saturating_add(1);
                    entry.state = State::Backoff { until: Instant::now() + wait };
                    tracing::warn!(source = %self.src.name, path = %path.display(), error = %e, retry_in = ?wait, "cannot read the file");
                }
            }
        }
    }
}

impl Folder {
    /// The `message_id` of a stored result that covers the file at `path` as it is now.
    fn stored_result(&self, path: &Path, records: &[(FileVersion, uuid::Uuid)]) -> Option<uuid::Uuid> {
        let now = Stamp::of(&std::fs::symlink_metadata(path).ok()?).version()?;
        records.iter().find(|(v, _)| *v == now).map(|(_, id)| *id)
    }
}

enum ReadOutcome {
    Whole {
        bytes: Vec<u8>,
        /// The file that was read, as it was.
        stamp: Stamp,
    },
    /// The file changed while it was read.
    Changing,
    TooLarge(u64),
}

fn read_file(path: &Path, limit: u64) -> io::Result<ReadOutcome> {
    let file = std::fs::File::open(path)?;
    let before = file.metadata()?;
    if before.len() > limit {
        return Ok(ReadOutcome::TooLarge(before.len()));
    }
    let mut bytes = Vec::with_capacity(before.len() as usize);
    (&file).take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Ok(ReadOutcome::TooLarge(bytes.len() as u64));
    }
    let after = std::fs::symlink_metadata(path)?;
    if after.len() != bytes.len() as u64 || after.modified().ok() != before.modified().ok() {
        return Ok(ReadOutcome::Changing);
    }
    Ok(ReadOutcome::Whole { bytes, stamp: Stamp::of(&before) })
}

fn dir_id(dir: &Path) -> io::Result<Option<(u64, u64)>> {
    std::fs::metadata(dir).map(|m| file_id(&m))
}

/// Device and inode: what stays the same for one file (or directory) and differs for one put in its place.
#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn file_id(_meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// `<file>.error.txt` next to a file in `failed/`.
pub fn error_file(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".error.txt");
    path.with_file_name(name)
}

/// Moves `src` into `dir` (created if needed) under its own name, or `stem-1.ext`, `stem-2.ext`, … when taken.
/// Falls back to copy-and-delete across file systems. Returns the new path.
pub fn move_into(src: &Path, dir: &Path) -> io::Result<PathBuf> {
    move_checked(src, dir, None)
}

/// [`move_into`] for a file that must still be the version `read_as` that was processed. A rename takes whatever
/// the name holds at that instant, microseconds after the caller's check. A copy across file systems takes as long as
/// the file's copy and fsync, and a photo exported again under the same name meanwhile must be neither filed in
/// place of the processed one nor deleted unprocessed. So the copy is made from the file opened once and checked
/// against `read_as`, and the name is unlinked only if it still holds that same file; otherwise the new one stays
/// in the folder to be processed.
fn move_checked(src: &Path, dir: &Path, read_as: Option<Stamp>) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = src.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let name = Path::new(name);
    let stem = name.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ext = name.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    for n in 0u32.. {
        let cand = if n == 0 { dir.join(name) } else { dir.join(format!("{stem}-{n}{ext}")) };
        // Only attrd writes into done/ and failed/, so checking first does not race with anyone that matters.
        if std::fs::symlink_metadata(&cand).is_ok() || std::fs::symlink_metadata(error_file(&cand)).is_ok() {
            continue;
        }
        return match std::fs::rename(src, &cand) {
            Ok(()) => Ok(cand),
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                let from = std::fs::File::open(src)?;
                let opened = from.metadata()?;
                if read_as.is_some_and(|r| Stamp::of(&opened) != r) {
                    return Err(io::Error::other(Replaced));
                }
                copy_new(from, &cand)?;
                match std::fs::symlink_metadata(src) {
                    Ok(now) if file_id(&now) == file_id(&opened) => std::fs::remove_file(src)?,
                    // Another file took the name during the copy: it stays, to be processed in its turn.
                    _ => tracing::info!(path = %src.display(), "the file was replaced while it was copied out; the \
                        new version stays in the folder"),
                }
                Ok(cand)
            }
            Err(e) => Err(e),
        };
    }
    Err(io::Error::other("no free file name"))
}

/// [`move_checked`]'s answer for a file that is no longer the version that was processed.
#[derive(Debug, thiserror::Error)]
#[error("replaced since it was processed; not moved")]
struct Replaced;

fn copy_new(mut from: std::fs::File, dst: &Path) -> io::Result<()> {
    let mut to = std::fs::OpenOptions::new().write(true).create_new(true).open(dst)?;
    let copied = io::copy(&mut from, &mut to).and_then(|_| to.sync_all());
    if copied.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    copied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_time_is_the_modification_time_or_now_where_time_cannot_hold_it() {
        let at = |secs: i64| {
            let d = Duration::from_secs(secs.unsigned_abs());
            if secs >= 0 { SystemTime::UNIX_EPOCH + d } else { SystemTime::UNIX_EPOCH - d }
        };
        assert_eq!(capture_time(Some(at(1_700_000_000))).unix_timestamp(), 1_700_000_000);
        assert_eq!(capture_time(Some(at(-86_400))).unix_timestamp(), -86_400);
        // 253,402,300,800 s is 10000-01-01: beyond what `time` holds without its large-dates feature.
        for secs in [253_402_300_800, 1 << 40, -400_000_000_000, -(1 << 40)] {
            let before = OffsetDateTime::now_utc();
            let got = capture_time(Some(at(secs)));
            assert!(got >= before && got <= OffsetDateTime::now_utc(), "{secs}: {got}");
        }
        let before = OffsetDateTime::now_utc();
        assert!(capture_time(None) >= before);
    }

    #[test]
    fn default_pattern_takes_the_name_up_to_the_first_underscore_or_dot() {
        let p = SkuPattern::new(DEFAULT_SKU_PATTERN).unwrap();
        assert_eq!(p.sku("SKU123_front.jpg").as_deref(), Some("SKU123"));
        assert_eq!(p.sku("SKU123.jpg").as_deref(), Some("SKU123"));
        assert_eq!(p.sku("_front.jpg"), None);
        assert!(SkuPattern::new("^(?P<id>.+)$").is_err());
        assert!(SkuPattern::new("(").is_err());
    }

    #[test]
    fn a_move_across_file_systems_files_only_the_version_that_was_processed() {
        // tmpfs for the hot folder, the disk for done/: rename fails with EXDEV and the copy path runs.
        let hot = tempfile::tempdir_in("/dev/shm").unwrap();
        let disk = tempfile::tempdir().unwrap();
        let dev = |p: &Path| file_id(&std::fs::metadata(p).unwrap()).unwrap().0;
        assert_ne!(dev(hot.path()), dev(disk.path()), "the test needs two file systems");
        let done = disk.path().join("done");
        let f = hot.path().join("A_1.jpg");
        let stamp = |p: &Path| Stamp::of(&std::fs::metadata(p).unwrap());

        std::fs::write(&f, b"v1").unwrap();
        let to = move_checked(&f, &done, Some(stamp(&f))).unwrap();
        assert!(!f.exists());
        assert_eq!(std::fs::read(&to).unwrap(), b"v1");

        // Exported again, as studios do (written aside, renamed over the name), after its predecessor was processed:
        // neither filed in place of the processed photo nor deleted.
        std::fs::write(&f, b"v2").unwrap();
        let processed = stamp(&f);
        let aside = hot.path().join(".A_1.jpg.tmp");
        std::fs::write(&aside, b"v3").unwrap();
        std::fs::rename(&aside, &f).unwrap();
        let e = move_checked(&f, &done, Some(processed)).unwrap_err();
        assert!(e.to_string().contains("replaced"), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"v3");
        let mut names: Vec<_> = std::fs::read_dir(&done).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["A_1.jpg"], "nothing copied for the replaced photo");
    }

    #[test]
    fn move_into_suffixes_collisions() {
        let t = tempfile::tempdir().unwrap();
        let done = t.path().join("done");
        for i in 0..3 {
            let f = t.path().join("A_1.jpg");
            std::fs::write(&f, [i]).unwrap();
            let to = move_into(&f, &done).unwrap();
            assert!(!f.exists());
            assert_eq!(std::fs::read(&to).unwrap(), [i]);
        }
        let mut names: Vec<_> = std::fs::read_dir(&done).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["A_1-1.jpg", "A_1-2.jpg", "A_1.jpg"]);
        assert_eq!(error_file(&done.join("x.jpg")), done.join("x.jpg.error.txt"));
    }

    #[test]
    fn config_rejects_nonsense() {
        let ok = HotfolderConfig { dir: "/x".into(), ..HotfolderConfig::default() };
        assert!(HotfolderSource::new(ok.clone()).is_ok());
        assert!(HotfolderSource::new(HotfolderConfig { extensions: vec![], ..ok.clone() }).is_err());
        assert!(HotfolderSource::new(HotfolderConfig { sku_pattern: "x".into(), ..ok.clone() }).is_err());
        let c: HotfolderConfig = serde_json::from_str(r#"{"dir":"/in","settle":"250ms"}"#).unwrap();
        assert_eq!(c.settle, Duration::from_millis(250));
        assert_eq!(c.done_dir(), Path::new("/in/done"));
    }
}
