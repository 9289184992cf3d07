//! Capture sources: where product photos come from (hot folders, V4L2 cameras; HTTP uploads live with the API).
//!
//! Every source turns photos into [`Shot`]s and sends them into the pipeline's bounded channel, so a slow pipeline
//! slows capture down instead of growing memory. Each shot carries a oneshot through which the source learns what
//! became of it ([`ShotOutcome`]): only once the result is durable in the outbox may a source forget the photo
//! (a hot folder moves the file to `done/`), and a "retry later" answer means it must keep it and try again.

pub mod fake;
pub mod hotfolder;
pub mod v4l2;

use crate::outbox::{CoveredFile, FileVersion, Outbox};
use crate::payload::{SourceInfo, SourceKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};

pub use hotfolder::{HotfolderConfig, HotfolderSource};
pub use v4l2::{CameraSource, FrameGrabber, HeldFrame, HeldFrames, Trigger, V4l2Config};

/// One configured source. The `type` field selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// A directory that photos are written or copied into.
    Hotfolder(HotfolderConfig),
    /// A V4L2 camera (`/dev/videoN`).
    V4l2(V4l2Config),
}

impl SourceConfig {
    /// The source's name, as used in logs and for trigger routing.
    pub fn name(&self) -> String {
        match self {
            SourceConfig::Hotfolder(c) => c.source_name(),
            SourceConfig::V4l2(c) => c.camera_id(),
        }
    }
}

/// Where a shot came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A file in a hot folder: the folder's `name`, the file's path when it was read and the version read (`None`
    /// where the platform gives no inode).
    Hotfolder { source: String, path: PathBuf, version: Option<FileVersion> },
    /// A V4L2 camera.
    V4l2 { camera: String },
    /// An HTTP upload; `client` is the peer address when known.
    Http { client: Option<String> },
    /// A simulated camera serving recorded frames (tests, demos).
    Fake { camera: String },
}

impl Origin {
    /// The `source` label of `attrd_images_total`: the hot folder's or camera's name, or `http`.
    pub fn source_name(&self) -> &str {
        match self {
            Origin::Hotfolder { source, .. } => source,
            Origin::V4l2 { camera } | Origin::Fake { camera } => camera,
            Origin::Http { .. } => "http",
        }
    }

    pub fn kind(&self) -> SourceKind {
        match self {
            Origin::Hotfolder { .. } => SourceKind::Hotfolder,
            Origin::V4l2 { .. } => SourceKind::V4l2,
            Origin::Http { .. } => SourceKind::Http,
            Origin::Fake { .. } => SourceKind::Fake,
        }
    }

    /// The hot-folder file this is, in the version read: what a stored result records as covered.
    pub fn covered_file(&self) -> Option<CoveredFile> {
        match self {
            Origin::Hotfolder { path, version: Some(version), .. } => {
                Some(CoveredFile { path: path.clone(), version: *version })
            }
            _ => None,
        }
    }

    /// The payload's `source` object for an image with this origin.
    pub fn source_info(&self, image_sha256: String) -> SourceInfo {
        let (camera, path) = match self {
            Origin::Hotfolder { path, .. } => (None, Some(path.display().to_string())),
            Origin::V4l2 { camera } | Origin::Fake { camera } => (Some(camera.clone()), None),
            Origin::Http { .. } => (None, None),
        };
        SourceInfo { kind: self.kind(), camera, path, image_sha256 }
    }
}

/// What became of a shot, as told to its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShotOutcome {
    /// The result (possibly fused with other views) is stored durably in the outbox; the photo may be forgotten.
    Durable,
    /// The photo can never produce a result (unreadable image, …); the reason is for people.
    Failed(String),
    /// Nothing was stored, but trying again later may work (outbox full, pipeline shutting down, engine error).
    RetryLater(String),
}

/// One photo of one SKU on its way into the pipeline.
#[derive(Debug)]
pub struct Shot {
    pub sku: String,
    /// The encoded image (JPEG, PNG or WebP).
    pub bytes: Vec<u8>,
    pub captured_at: OffsetDateTime,
    pub origin: Origin,
    /// Resolved exactly once with the shot's outcome; `None` when the source does not care.
    pub done: Option<oneshot::Sender<ShotOutcome>>,
    /// A camera frame kept in the outbox database ([`HeldFrames`]): its key, for the result's transaction to release
    /// it, so that a crash cannot leave both the result and the frame, which would be processed again.
    pub kept_frame: Option<i64>,
}

impl Shot {
    /// A shot whose outcome the caller awaits on the returned receiver (see [`outcome`]).
    pub fn new(
        sku: impl Into<String>,
        bytes: Vec<u8>,
        captured_at: OffsetDateTime,
        origin: Origin,
    ) -> (Shot, oneshot::Receiver<ShotOutcome>) {
        let (tx, rx) = oneshot::channel();
        (Shot { sku: sku.into(), bytes, captured_at, origin, done: Some(tx), kept_frame: None }, rx)
    }
}

/// Awaits a shot's outcome. A sender dropped without an answer means the pipeline stopped, which reads as "retry
/// later".
pub async fn outcome(rx: oneshot::Receiver<ShotOutcome>) -> ShotOutcome {
    rx.await.unwrap_or_else(|_| ShotOutcome::RetryLater("the pipeline stopped before answering".into()))
}

/// Sending side of a shutdown signal. Dropping it also signals shutdown, so a forgotten handle cannot leave sources
/// running forever.
#[derive(Debug)]
pub struct ShutdownSignal {
    tx: watch::Sender<bool>,
}

impl Default for ShutdownSignal {
    fn default() -> Self {
        Self::new()
    }
}

impl ShutdownSignal {
    pub fn new() -> Self {
        ShutdownSignal { tx: watch::channel(false).0 }
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown { rx: self.tx.subscribe() }
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

/// Receiving side of a shutdown signal; cheap to clone. (A `watch` rather than tokio-util's `CancellationToken`, to
/// need no extra crate.)
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// Resolves once shutdown was triggered (or its [`ShutdownSignal`] dropped). Cancel-safe.
    pub async fn wait(&mut self) {
        // `wait_for` errors only when the sender is gone, which means shutdown too.
        let _ = self.rx.wait_for(|&stop| stop).await;
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }
}

/// The future a running source is.
pub type SourceFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A capture source. `run` keeps going until shutdown, handling its own errors (a missing directory or an unplugged
/// camera is reported and retried, never fatal), sending shots into `tx`; it drops `tx` when it ends, after the
/// shots it has in flight were answered.
///
/// A boxed future rather than an `async fn`, so that sources stay usable as `Box<dyn Source>` without extra crates.
pub trait Source: Send {
    fn name(&self) -> &str;
    fn run(self: Box<Self>, tx: mpsc::Sender<Shot>, shutdown: Shutdown) -> SourceFuture;
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error("source {source_name}: invalid sku_pattern {pattern:?}")]
    BadPattern {
        source_name: String,
        pattern: String,
        #[source]
        source: Box<regex::Error>,
    },
    #[error("source {source_name}: {reason}")]
    Config { source_name: String, reason: String },
    #[error("two sources are named {0:?}; names must be unique")]
    DuplicateName(String),
    #[error(
        "camera {camera} ({}): V4L2 capture is not compiled into this build (build attrd with the `v4l2` feature, \
         which needs libclang)", device.display()
    )]
    V4l2Unavailable { camera: String, device: PathBuf },
}

/// The sources built from configuration, plus a trigger sender for each camera (for the HTTP/MQTT trigger
/// endpoints), keyed by camera id.
pub struct Sources {
    pub sources: Vec<Box<dyn Source>>,
    pub triggers: BTreeMap<String, mpsc::Sender<Trigger>>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("sources", &self.sources.iter().map(|s| s.name()).collect::<Vec<_>>())
            .field("triggers", &self.triggers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// How many triggers may wait for a camera before senders wait in turn.
const TRIGGER_QUEUE: usize = 16;

/// Builds every configured source, validating all of them first. V4L2 cameras get the grabber `grabbers` makes,
/// and leave frames not stored yet when they stop in `held`; hot folders file what `outbox` already has results
/// for ([`HotfolderSource::with_outbox`]).
pub fn build_with(
    configs: &[SourceConfig],
    held: &HeldFrames,
    outbox: Option<&Outbox>,
    mut grabbers: impl FnMut(&V4l2Config) -> Result<Box<dyn FrameGrabber>, SourceError>,
) -> Result<Sources, SourceError> {
    validate(configs)?;
    let mut out = Sources { sources: Vec::new(), triggers: BTreeMap::new() };
    for cfg in configs {
        let name = cfg.name();
        match cfg {
            SourceConfig::Hotfolder(c) => {
                let mut h = HotfolderSource::new(c.clone())?;
                if let Some(o) = outbox {
                    h = h.with_outbox(o.clone());
                }
                out.sources.push(Box::new(h));
            }
            SourceConfig::V4l2(c) => {
                let (tx, rx) = mpsc::channel(TRIGGER_QUEUE);
                let grabber = grabbers(c)?;
                out.sources.push(Box::new(CameraSource::new(c.clone(), grabber, Some(rx))?.holding(held.clone())));
                out.triggers.insert(name, tx);
            }
        }
    }
    Ok(out)
}

/// Checks sources' settings as [`build`] does, without opening a folder or a device: each source's own settings,
/// unique names, and hot folders that do not overlap. A `done/` that is its own hot folder (or another source's)
/// would have each filed photo taken again as a new one; two sources on one folder would process, or fail, each
/// other's photos (unless they take different extensions).
pub fn validate(configs: &[SourceConfig]) -> Result<(), SourceError> {
    let mut names = std::collections::BTreeSet::new();
    let mut folders: Vec<(String, PathBuf, PathBuf, PathBuf, Vec<String>)> = Vec::new();
    for cfg in configs {
        let name = cfg.name();
        if !names.insert(name.clone()) {
            return Err(SourceError::DuplicateName(name));
        }
        match cfg {
            SourceConfig::Hotfolder(c) => {
                let h = HotfolderSource::new(c.clone())?;
                folders.push((name, c.dir.clone(), c.done_dir(), c.failed_dir(), h.extensions().to_vec()));
            }
            SourceConfig::V4l2(c) => {
                // As built: with its trigger channel.
                let (_tx, rx) = mpsc::channel(1);
                CameraSource::new(c.clone(), Box::new(v4l2::Unplugged), Some(rx))?;
            }
        }
    }
    let clash = |name: &str, reason: String| Err(SourceError::Config { source_name: name.to_owned(), reason });
    for (i, (name, dir, done, failed, exts)) in folders.iter().enumerate() {
        for (what, d) in [("done_dir", done), ("failed_dir", failed)] {
            if d == dir {
                return clash(name, format!("{what} {} is the hot folder itself", d.display()));
            }
        }
        for (other, odir, odone, ofailed, oexts) in &folders[i + 1..] {
            // Two sources may share a folder when they take different kinds of file (one JPEG, one PNG): each
            // leaves the other's files alone.
            if odir == dir && exts.iter().any(|e| oexts.contains(e)) {
                return clash(
                    name,
                    format!("{other} watches the same folder, {}, for the same kind of file", dir.display()),
                );
            }
            for (who, what, d, watched) in [
                (name, "done_dir", done, odir),
                (name, "failed_dir", failed, odir),
                (other, "done_dir", odone, dir),
                (other, "failed_dir", ofailed, dir),
            ] {
                if d == watched {
                    return clash(who, format!("{what} {} is another source's hot folder", d.display()));
                }
            }
        }
    }
    Ok(())
}

/// [`build_with`] using real V4L2 devices for cameras (or their `replay` directories).
pub fn build(configs: &[SourceConfig], held: &HeldFrames, outbox: Option<&Outbox>) -> Result<Sources, SourceError> {
    build_with(configs, held, outbox, v4l2::grabber)
}

/// Runs sources concurrently until all of them end (after shutdown). A source that panics is logged; the others
/// keep running.
pub async fn run_all(sources: Vec<Box<dyn Source>>, tx: mpsc::Sender<Shot>, shutdown: Shutdown) {
    let mut set = tokio::task::JoinSet::new();
    for s in sources {
        let name = s.name().to_string();
        tracing::info!(source = %name, "source starting");
        let fut = s.run(tx.clone(), shutdown.clone());
        set.spawn(async move {
            fut.await;
            name
        });
    }
    drop(tx);
    while let Some(res) = set.join_next().await {
        match res {
            Ok(name) => tracing::info!(source = %name, "source stopped"),
            Err(e) => tracing::error!(error = %e, "a source task failed"),
        }
    }
}

pub(crate) use crate::util::error_chain;

/// Exponential backoff between `min` and `max`: `min * 2^attempt`, capped.
pub(crate) fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    min.saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX)).min(max).max(min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let (a, b) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff(a, b, 0), a);
        assert_eq!(backoff(a, b, 1), Duration::from_millis(200));
        assert_eq!(backoff(a, b, 3), Duration::from_millis(800));
        assert_eq!(backoff(a, b, 4), b);
        assert_eq!(backoff(a, b, 200), b);
    }

    #[test]
    fn config_is_a_closed_tagged_enum() {
        let c: SourceConfig = serde_json::from_str(r#"{"type":"hotfolder","dir":"/in"}"#).unwrap();
        assert!(matches!(c, SourceConfig::Hotfolder(ref h) if h.dir == std::path::Path::new("/in")));
        let c: SourceConfig = serde_json::from_str(r#"{"type":"v4l2","device":"/dev/video0"}"#).unwrap();
        assert!(matches!(c, SourceConfig::V4l2(_)));
        assert!(serde_json::from_str::<SourceConfig>(r#"{"type":"ftp","dir":"/in"}"#).is_err());
        assert!(serde_json::from_str::<SourceConfig>(r#"{"type":"hotfolder","dir":"/in","bogus":1}"#).is_err());
    }

    #[tokio::test]
    async fn shutdown_fires_on_trigger_and_on_drop() {
        let s = ShutdownSignal::new();
        let mut a = s.subscribe();
        assert!(!a.is_triggered());
        s.trigger();
        a.wait().await;
        assert!(a.is_triggered());
        let s = ShutdownSignal::new();
        let mut b = s.subscribe();
        drop(s);
        b.wait().await;
        assert!(b.is_triggered());
    }
}
