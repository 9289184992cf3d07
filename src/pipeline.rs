//! The inference pipeline: shots from every source → decode and preprocess on a bounded worker pool → micro-batches
//! → the engine → (optional) multi-view fusion per SKU → finished results for the outbox.
//!
//! ```text
//! sources ─Shot─▶ [queue] ─▶ intake ─▶ decode workers (spawn_blocking, at most decode_workers at once)
//!                                         │ bad image → ShotOutcome::Failed at once
//!                                         ▼
//!                      [max_batch] ─▶ batcher (≤ max_batch images or max_wait) ─▶ Engine::infer
//!                                         ▼
//!                      [max_batch] ─▶ emitter (fusion_window) ─Finished─▶ out (the outbox writer)
//!                                                                  │ durable: Ok / Err
//!                                         each contributing shot's `done` ◀┘
//! ```
//!
//! Every hop is a bounded channel and every stage awaits the next one, so a slow consumer of `out` fills the
//! channels in turn and stops intake: memory stays bounded whatever the sources do. The engine is read from the
//! `ArcSwap` for each shot when it is preprocessed, and a batch only ever holds shots preprocessed for the same
//! engine, so swapping models is safe at any moment: shots in flight finish on the model they were prepared for,
//! later ones use the new one.

use crate::engine::{Attributes, Engine, EngineError, postprocess};
use crate::metrics::{ErrorKind, Metrics};
use crate::outbox::CoveredFile;
use crate::payload::{Latency, ModelInfo, ResultPayload, SCHEMA_VERSION, ViewResult, ms};
use crate::preprocess::{Limits, Preprocessor};
use crate::sources::{Origin, Shot, ShotOutcome, error_chain};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Batching, queueing and fusion settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Most images in one inference call. Default 8.
    pub max_batch: usize,
    /// Longest a batch waits to fill up after its first image is ready. Default 20ms.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Shots that may wait for the pipeline before sources have to wait (the intake channel's size). Default 64.
    pub queue: usize,
    /// Shots of the same SKU whose results arrive within this window of the first are fused into one result
    /// (mean of the views' probabilities). Default 0: off, every shot is its own result.
    #[serde(with = "humantime_serde")]
    pub fusion_window: Duration,
    /// Images decoded and preprocessed at once, on blocking threads. Default: one per CPU core.
    pub decode_workers: usize,
    /// Limits on untrusted images (file size, pixel count).
    pub limits: Limits,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_batch: 8,
            max_wait: Duration::from_millis(20),
            queue: 64,
            fusion_window: Duration::ZERO,
            decode_workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            limits: Limits::default(),
        }
    }
}

impl PipelineConfig {
    pub fn validate(&self) -> Result<(), PipelineError> {
        let bad = |s: &str| Err(PipelineError::Config(s.to_string()));
        if self.max_batch == 0 {
            return bad("max_batch must be at least 1");
        }
        if self.queue == 0 {
            return bad("queue must be at least 1");
        }
        if self.decode_workers == 0 {
            return bad("decode_workers must be at least 1");
        }
        self.limits.validate().map_err(|e| PipelineError::Config(e.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    #[error("invalid pipeline configuration: {0}")]
    Config(String),
}

/// A result ready to be stored. Whoever receives it (the outbox writer) must answer `durable`: `Ok(())` once the
/// payload is stored durably, [`NotStored`] when it was not. Not answering (dropping the sender) counts as
/// `NotStored::Later`. Every contributing shot learns the answer: `Durable`, `RetryLater(reason)` or
/// `Failed(reason)`.
#[derive(Debug)]
pub struct Finished {
    pub payload: ResultPayload,
    /// The hot-folder files (in the versions read) the result covers, for the outbox to record with it.
    pub covers: Vec<CoveredFile>,
    /// The kept camera frames it is the result of, for the outbox to release with it.
    pub releases: Vec<i64>,
    pub durable: oneshot::Sender<Result<(), NotStored>>,
}

/// Why a result was not stored, which decides what becomes of its photos.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotStored {
    /// Storing may work later (the outbox is full or cannot write, or is shutting down): the sources keep the photos
    /// and try again.
    Later(String),
    /// It never will: the result cannot become a message (its SKU cannot be a topic segment, or it is larger than
    /// the whole outbox). Trying again would compute the same refusal forever, so the photos fail.
    Never(String),
}

impl std::fmt::Display for NotStored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotStored::Later(r) | NotStored::Never(r) => f.write_str(r),
        }
    }
}

/// Counters, for metrics and tests. All monotonic but `batches_running` (batches in the engine now); the `max_`
/// ones only grow.
#[derive(Debug, Default)]
pub struct PipelineStats {
    received: AtomicU64,
    decode_failed: AtomicU64,
    batches: AtomicU64,
    inferred: AtomicU64,
    max_batch_seen: AtomicU64,
    batches_running: AtomicU64,
    max_batches_running: AtomicU64,
    results: AtomicU64,
    durable: AtomicU64,
    failed: AtomicU64,
    retry_later: AtomicU64,
}

/// A copy of [`PipelineStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Shots taken from the intake channel.
    pub received: u64,
    /// Shots whose image could not be decoded or preprocessed.
    pub decode_failed: u64,
    /// Inference calls.
    pub batches: u64,
    /// Images run through the model.
    pub inferred: u64,
    /// Largest batch so far.
    pub max_batch_seen: u64,
    /// Most batches being inferred at the same time so far (at most the engine's `sessions`).
    pub max_batches_running: u64,
    /// Results handed to `out` (a fused result counts once).
    pub results: u64,
    /// Shots answered `Durable`.
    pub durable: u64,
    /// Shots answered `Failed`.
    pub failed: u64,
    /// Shots answered `RetryLater`.
    pub retry_later: u64,
}

impl StatsSnapshot {
    /// Shots received and not answered yet.
    pub fn in_flight(&self) -> u64 {
        self.received.saturating_sub(self.durable + self.failed + self.retry_later)
    }
}

impl PipelineStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            received: g(&self.received),
            decode_failed: g(&self.decode_failed),
            batches: g(&self.batches),
            inferred: g(&self.inferred),
            max_batch_seen: g(&self.max_batch_seen),
            max_batches_running: g(&self.max_batches_running),
            results: g(&self.results),
            durable: g(&self.durable),
            failed: g(&self.failed),
            retry_later: g(&self.retry_later),
        }
    }

    fn resolve(&self, done: Option<oneshot::Sender<ShotOutcome>>, outcome: ShotOutcome) {
        let counter = match outcome {
            ShotOutcome::Durable => &self.durable,
            ShotOutcome::Failed(_) => &self.failed,
            ShotOutcome::RetryLater(_) => &self.retry_later,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(done) = done {
            // The source may have stopped listening; the outcome is then nobody's concern.
            let _ = done.send(outcome);
        }
    }
}

/// A running pipeline.
#[derive(Debug)]
pub struct Pipeline {
    /// Where sources send shots (clone it per source). The pipeline drains and ends once every clone is dropped.
    pub shots: mpsc::Sender<Shot>,
    /// Ends when the pipeline has drained: every received shot answered, every `durable` awaited.
    pub task: JoinHandle<()>,
    pub stats: Arc<PipelineStats>,
}

/// The model a shot was prepared for.
struct Model {
    engine: Arc<Engine>,
    pre: Preprocessor,
    info: ModelInfo,
}

struct Meta {
    sku: String,
    captured_at: OffsetDateTime,
    origin: Origin,
    done: Option<oneshot::Sender<ShotOutcome>>,
    received: Instant,
    kept_frame: Option<i64>,
}

struct Prepared {
    meta: Meta,
    sha256: String,
    tensor: Vec<f32>,
    model: Arc<Model>,
    decode: Duration,
    /// Waiting for a decode worker.
    waited: Duration,
    ready_at: Instant,
}

struct View {
    meta: Meta,
    sha256: String,
    probs: Vec<Vec<f32>>,
    attributes: Attributes,
    model: Arc<Model>,
    latency: Latency,
    /// When its inference finished.
    inferred_at: Instant,
}

impl Pipeline {
    /// Starts the pipeline on the current tokio runtime. `engine` may be swapped at any time (hot model reload).
    /// Its metrics go to a registry of its own; see [`Pipeline::spawn_with_metrics`].
    pub fn spawn(
        engine: Arc<ArcSwap<Engine>>,
        cfg: PipelineConfig,
        node: impl Into<String>,
        out: mpsc::Sender<Finished>,
    ) -> Result<Pipeline, PipelineError> {
        Self::spawn_with_metrics(engine, cfg, node, out, Metrics::new())
    }

    /// [`Pipeline::spawn`], counting into `metrics`: `attrd_images_total` by source, `attrd_batch_size` per engine
    /// run, and `attrd_errors_total` for images that fail to decode, inferences that fail and a missing model.
    pub fn spawn_with_metrics(
        engine: Arc<ArcSwap<Engine>>,
        cfg: PipelineConfig,
        node: impl Into<String>,
        out: mpsc::Sender<Finished>,
        metrics: Metrics,
    ) -> Result<Pipeline, PipelineError> {
        cfg.validate()?;
        let node = node.into();
        let stats = Arc::new(PipelineStats::default());
        let (shots, shots_rx) = mpsc::channel(cfg.queue);
        let (prepared_tx, prepared_rx) = mpsc::channel(cfg.max_batch);
        let (views_tx, views_rx) = mpsc::channel(cfg.max_batch);
        let intake = tokio::spawn(intake(shots_rx, engine, cfg.clone(), stats.clone(), metrics.clone(), prepared_tx));
        let batcher = tokio::spawn(batcher(prepared_rx, cfg.clone(), stats.clone(), metrics, views_tx));
        let emitter = tokio::spawn(emitter(views_rx, cfg.fusion_window, node, stats.clone(), out));
        let st = stats.clone();
        let task = tokio::spawn(async move {
            for (stage, t) in [("intake", intake), ("batcher", batcher), ("emitter", emitter)] {
                if let Err(e) = t.await {
                    tracing::error!(stage, error = %e, "pipeline stage failed");
                }
            }
            tracing::info!(stats = ?st.snapshot(), "pipeline drained");
        });
        Ok(Pipeline { shots, task, stats })
    }
}

/// The model for the engine currently in `cell`, reusing the preprocessor while the engine stays the same.
fn current_model(cell: &ArcSwap<Engine>, cache: &mut Option<Arc<Model>>, limits: Limits) -> Result<Arc<Model>, String> {
    let engine = cell.load_full();
    if let Some(m) = cache.as_ref().filter(|m| Arc::ptr_eq(&m.engine, &engine)) {
        return Ok(m.clone());
    }
    let pre = Preprocessor::new(engine.manifest().input.clone(), limits)
        .map_err(|e| format!("the model's input spec is unusable: {}", error_chain(&e)))?;
    let m = Arc::new(Model { info: ModelInfo::of(&engine), engine, pre });
    tracing::info!(model = %m.info.name, version = %m.info.version, provider = %m.info.execution_provider, "pipeline uses model");
    *cache = Some(m.clone());
    Ok(m)
}

async fn intake(
    mut rx: mpsc::Receiver<Shot>,
    engine: Arc<ArcSwap<Engine>>,
    cfg: PipelineConfig,
    stats: Arc<PipelineStats>,
    metrics: Metrics,
    prepared: mpsc::Sender<Prepared>,
) {
    let workers = Arc::new(Semaphore::new(cfg.decode_workers));
    let mut cache = None;
    while let Some(shot) = rx.recv().await {
        let received = Instant::now();
        stats.received.fetch_add(1, Ordering::Relaxed);
        metrics.image(shot.origin.source_name());
        // Invariant: the semaphore is never closed.
        let Ok(permit) = workers.clone().acquire_owned().await else { break };
        let Shot { sku, bytes, captured_at, origin, done, kept_frame } = shot;
        let meta = Meta { sku, captured_at, origin, done, received, kept_frame };
        let model = match current_model(&engine, &mut cache, cfg.limits) {
            Ok(m) => m,
            Err(reason) => {
                metrics.error(ErrorKind::Model);
                tracing::error!(%reason, "no usable model");
                stats.resolve(meta.done, ShotOutcome::RetryLater(reason));
                continue;
            }
        };
        let tx = prepared.clone();
        let stats = stats.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let waited = started - meta.received;
            let pre = model.pre.clone();
            let work = tokio::task::spawn_blocking(move || {
                let sha = crate::bundle::sha256_bytes(&bytes);
                (sha, pre.prepare(&bytes))
            });
            let res = work.await;
            let decode = started.elapsed();
            let (kind, reason) = match res {
                Ok((sha256, Ok(tensor))) => {
                    let item = Prepared { meta, sha256, tensor, model, decode, waited, ready_at: Instant::now() };
                    if let Err(mpsc::error::SendError(item)) = tx.send(item).await {
                        stats.resolve(item.meta.done, ShotOutcome::RetryLater("the pipeline is stopping".into()));
                    }
                    drop(permit);
                    return;
                }
                Ok((_, Err(e))) => (ErrorKind::from(&e), error_chain(&e)),
                Err(e) => (ErrorKind::Internal, format!("the decoder crashed: {e}")),
            };
            stats.decode_failed.fetch_add(1, Ordering::Relaxed);
            metrics.error(kind);
            tracing::warn!(sku = %meta.sku, origin = ?meta.origin, %reason, "image rejected");
            stats.resolve(meta.done, ShotOutcome::Failed(reason));
            drop(permit);
        });
    }
}

async fn batcher(
    mut rx: mpsc::Receiver<Prepared>,
    cfg: PipelineConfig,
    stats: Arc<PipelineStats>,
    metrics: Metrics,
    views: mpsc::Sender<View>,
) {
    let mut carry: Option<Prepared> = None;
    // Batches being inferred: as many at once as the engine runs side by side (`engine.sessions`), so that each
    // session has one while the next is collected.
    let mut running: JoinSet<()> = JoinSet::new();
    let mut parallelism = 1;
    loop {
        while running.len() >= parallelism {
            collect(running.join_next().await);
        }
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => break,
            },
        };
        let deadline = Instant::now() + cfg.max_wait;
        let mut batch = vec![first];
        while batch.len() < cfg.max_batch {
            tokio::select! {
                biased;
                item = rx.recv() => match item {
                    Some(p) if Arc::ptr_eq(&p.model, &batch[0].model) => batch.push(p),
                    // Prepared for another model (swapped meanwhile): it starts the next batch.
                    Some(p) => {
                        carry = Some(p);
                        break;
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        parallelism = batch[0].model.engine.parallelism().max(1);
        let (stats_in, metrics, views) = (stats.clone(), metrics.clone(), views.clone());
        running.spawn(async move {
            // Counted while it runs (a finished task waits in the set until it is collected).
            let now = stats_in.batches_running.fetch_add(1, Ordering::Relaxed) + 1;
            stats_in.max_batches_running.fetch_max(now, Ordering::Relaxed);
            let _running = Running(&stats_in);
            run_batch(batch, &stats_in, &metrics, &views).await
        });
    }
    // Every batch's views reach the emitter before it is told that no more come.
    while !running.is_empty() {
        collect(running.join_next().await);
    }
}

/// Logs a batch task that panicked or was cancelled, from what `JoinSet::join_next` answered.
fn collect(joined: Option<Result<(), tokio::task::JoinError>>) {
    if let Some(Err(e)) = joined {
        tracing::error!(error = %e, "a batch's inference task failed");
    }
}

/// A batch being run, counted in [`PipelineStats`] until dropped (also when the run panics).
struct Running<'a>(&'a PipelineStats);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.batches_running.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run_batch(batch: Vec<Prepared>, stats: &PipelineStats, metrics: &Metrics, views: &mpsc::Sender<View>) {
    let model = batch[0].model.clone();
    let tensors: Vec<Vec<f32>> = batch.iter().map(|p| p.tensor.clone()).collect();
    let n = batch.len();
    let started = Instant::now();
    // Invariant for `batch`: every tensor came from this model's preprocessor, so it has the spec's length.
    let res = model.engine.infer(model.pre.batch(&tensors)).await;
    let infer = started.elapsed();
    stats.batches.fetch_add(1, Ordering::Relaxed);
    metrics.observe_batch(n);
    stats.max_batch_seen.fetch_max(n as u64, Ordering::Relaxed);
    match res {
        Ok(out) => {
            stats.inferred.fetch_add(n as u64, Ordering::Relaxed);
            let probs = out.probabilities(model.engine.manifest());
            for (p, probs) in batch.into_iter().zip(probs) {
                let view = make_view(p, probs, started, infer);
                if let Err(mpsc::error::SendError(v)) = views.send(view).await {
                    stats.resolve(v.meta.done, ShotOutcome::RetryLater("the pipeline is stopping".into()));
                }
            }
        }
        Err(e) if n > 1 && !matches!(e, EngineError::Stopped) => {
            // One bad input must not sink its batch-mates: find it by running each image alone.
            tracing::warn!(error = %error_chain(&e), batch = n, "batch failed; retrying its images one by one");
            for p in batch {
                let started = Instant::now();
                let res = model.engine.infer(model.pre.batch(std::slice::from_ref(&p.tensor))).await;
                let infer = started.elapsed();
                stats.batches.fetch_add(1, Ordering::Relaxed);
                metrics.observe_batch(1);
                match res {
                    Ok(out) => {
                        stats.inferred.fetch_add(1, Ordering::Relaxed);
                        let probs = out.probabilities(model.engine.manifest()).into_iter().next().unwrap_or_default();
                        let view = make_view(p, probs, started, infer);
                        if let Err(mpsc::error::SendError(v)) = views.send(view).await {
                            stats.resolve(v.meta.done, ShotOutcome::RetryLater("the pipeline is stopping".into()));
                        }
                    }
                    Err(e) => fail_inference(stats, metrics, p.meta, &e),
                }
            }
        }
        Err(e) => {
            for p in batch {
                fail_inference(stats, metrics, p.meta, &e);
            }
        }
    }
}

fn fail_inference(stats: &PipelineStats, metrics: &Metrics, meta: Meta, e: &EngineError) {
    metrics.error(ErrorKind::Infer);
    let reason = format!("inference failed: {}", error_chain(e));
    tracing::warn!(sku = %meta.sku, %reason, "no result for shot");
    // A non-finite output or a malformed input is this image's doing; anything else (a stopped engine, a CUDA
    // error) may well pass on another try.
    let outcome = match e {
        EngineError::NonFinite { .. } | EngineError::BadBatch { .. } => ShotOutcome::Failed(reason),
        _ => ShotOutcome::RetryLater(reason),
    };
    stats.resolve(meta.done, outcome);
}

fn make_view(p: Prepared, probs: Vec<Vec<f32>>, infer_started: Instant, infer: Duration) -> View {
    let attributes = postprocess::attributes(p.model.engine.manifest(), &probs);
    let now = Instant::now();
    let latency = Latency {
        decode_preprocess: ms(p.decode),
        queue: ms(p.waited + infer_started.saturating_duration_since(p.ready_at)),
        infer: ms(infer),
        total: ms(now - p.meta.received),
    };
    View { meta: p.meta, sha256: p.sha256, probs, attributes, model: p.model, latency, inferred_at: now }
}

/// Views of one SKU waiting for the fusion window to close.
struct Group {
    deadline: Instant,
    views: Vec<View>,
}

async fn emitter(
    mut rx: mpsc::Receiver<View>,
    window: Duration,
    node: String,
    stats: Arc<PipelineStats>,
    out: mpsc::Sender<Finished>,
) {
    let mut groups: Vec<Group> = Vec::new();
    let mut waiters = JoinSet::new();
    loop {
        let next_deadline = groups.iter().map(|g| g.deadline).min();
        tokio::select! {
            v = rx.recv() => match v {
                None => break,
                Some(v) if window.is_zero() => emit(vec![v], &node, &stats, &out, &mut waiters).await,
                Some(v) => {
                    let same = |g: &&mut Group| g.views[0].meta.sku == v.meta.sku && Arc::ptr_eq(&g.views[0].model, &v.model);
                    match groups.iter_mut().find(|g| same(g)) {
                        Some(g) => g.views.push(v),
                        None => groups.push(Group { deadline: v.inferred_at + window, views: vec![v] }),
                    }
                }
            },
            _ = sleep_until_opt(next_deadline) => {
                let now = Instant::now();
                let (due, keep): (Vec<Group>, Vec<Group>) = groups.drain(..).partition(|g| g.deadline <= now);
                groups = keep;
                for g in due {
                    emit(g.views, &node, &stats, &out, &mut waiters).await;
                }
            }
            Some(_) = waiters.join_next(), if !waiters.is_empty() => {}
        }
    }
    // Draining: nothing more can join a group.
    for g in groups {
        emit(g.views, &node, &stats, &out, &mut waiters).await;
    }
    while waiters.join_next().await.is_some() {}
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Hands one SKU result to the outbox and arranges for its shots to learn whether it became durable.
async fn emit(
    views: Vec<View>,
    node: &str,
    stats: &Arc<PipelineStats>,
    out: &mpsc::Sender<Finished>,
    waiters: &mut JoinSet<()>,
) {
    let covers = views.iter().filter_map(|v| v.meta.origin.covered_file()).collect();
    let releases = views.iter().filter_map(|v| v.meta.kept_frame).collect();
    let (payload, dones) = build_payload(node, views);
    let (durable, answer) = oneshot::channel();
    let finished = Finished { payload, covers, releases, durable };
    if let Err(mpsc::error::SendError(f)) = out.send(finished).await {
        tracing::error!(sku = %f.payload.sku, "the outbox is gone; result not stored");
        for d in dones {
            stats.resolve(d, ShotOutcome::RetryLater("the outbox is not running".into()));
        }
        return;
    }
    stats.results.fetch_add(1, Ordering::Relaxed);
    let stats = stats.clone();
    waiters.spawn(async move {
        let outcome = match answer.await {
            Ok(Ok(())) => ShotOutcome::Durable,
            Ok(Err(NotStored::Later(reason))) => {
                ShotOutcome::RetryLater(format!("the result could not be stored: {reason}"))
            }
            Ok(Err(NotStored::Never(reason))) => ShotOutcome::Failed(format!("the result cannot be stored: {reason}")),
            Err(_) => ShotOutcome::RetryLater("the outbox dropped the result without storing it".into()),
        };
        for d in dones {
            stats.resolve(d, outcome.clone());
        }
    });
}

fn build_payload(node: &str, mut views: Vec<View>) -> (ResultPayload, Vec<Option<oneshot::Sender<ShotOutcome>>>) {
    let now = Instant::now();
    let model = views[0].model.clone();
    let dones: Vec<_> = views.iter_mut().map(|v| v.meta.done.take()).collect();
    let first_received = views.iter().map(|v| v.meta.received).min().unwrap_or(now);
    let captured_at = views.iter().map(|v| v.meta.captured_at).min().unwrap_or_else(OffsetDateTime::now_utc);
    let first = &views[0];
    let source = first.meta.origin.source_info(first.sha256.clone());
    let sku = first.meta.sku.clone();
    let (attributes, latency, view_results) = if views.len() == 1 {
        let v = views.remove(0);
        (v.attributes, Latency { total: ms(now - v.meta.received), ..v.latency }, Vec::new())
    } else {
        let probs: Vec<Vec<Vec<f32>>> = views.iter().map(|v| v.probs.clone()).collect();
        // Invariant: a group is never empty, so the mean exists.
        let fused = postprocess::mean_probabilities(&probs).unwrap_or_default();
        let attributes = postprocess::attributes(model.engine.manifest(), &fused);
        let max = |f: fn(&Latency) -> f64| views.iter().map(|v| f(&v.latency)).fold(0.0, f64::max);
        let latency = Latency {
            decode_preprocess: max(|l| l.decode_preprocess),
            queue: max(|l| l.queue),
            infer: max(|l| l.infer),
            total: ms(now - first_received),
        };
        let view_results = views
            .into_iter()
            .map(|v| ViewResult {
                captured_at: v.meta.captured_at,
                source: v.meta.origin.source_info(v.sha256),
                latency_ms: v.latency,
                attributes: v.attributes,
            })
            .collect();
        (attributes, latency, view_results)
    };
    let payload = ResultPayload {
        schema_version: SCHEMA_VERSION,
        message_id: String::new(),
        seq: 0,
        node: node.to_string(),
        sku,
        captured_at,
        published_at: None,
        source,
        model: model.info.clone(),
        latency_ms: latency,
        attributes,
        views: view_results,
    };
    (payload, dones)
}
