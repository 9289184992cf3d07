//! `attrd bench`: the daemon's own path end to end on a directory of photos: read → decode and preprocess (the
//! pipeline's worker pool) → micro-batched inference → the outbox writer (durable, grouped) → the MQTT publisher →
//! the broker's PUBACK. The pieces are the ones `attrd run` wires together; only the source differs (files fed as
//! fast as the pipeline takes them) and the state lives in a temporary directory.
//!
//! The clock runs from the first photo read until the outbox is empty, i.e. every result was acknowledged by the
//! broker. Per-stage latencies are the pipeline's own measurements of every result, plus the time to store it.

use super::outbox_writer;
use anyhow::{Context, Result, bail, ensure};
use arc_swap::ArcSwap;
use attrd::engine::{Engine, EngineConfig, Provider};
use attrd::metrics::Metrics;
use attrd::mqtt::{Connection, MqttConfig, Publisher};
use attrd::outbox::{Outbox, OutboxConfig};
use attrd::pipeline::{Finished, NotStored, Pipeline, PipelineConfig};
use attrd::sources::{Origin, Shot, ShotOutcome, outcome};
use attrd::systemd::Heartbeat;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long the broker may take to acknowledge the last results once every photo is stored.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// What `attrd bench` runs on.
pub(crate) struct BenchOptions {
    /// The bundle, already opened and verified.
    pub bundle: attrd::bundle::Bundle,
    /// Photo files, in the order they are fed.
    pub images: Vec<PathBuf>,
    /// Execution providers to try.
    pub providers: Vec<Provider>,
    /// ONNX Runtime intra-op threads per session (0 = ORT's default).
    pub threads: usize,
    /// Sessions running batches side by side.
    pub sessions: usize,
    /// Whether those threads spin between operators.
    pub spin: bool,
    /// Pipeline settings (batching, decode workers).
    pub pipeline: PipelineConfig,
    /// Broker to publish to.
    pub mqtt: MqttConfig,
}

/// p50 / p99 / max of one stage, in milliseconds.
#[derive(Debug, Serialize)]
struct Quantiles {
    p50: f64,
    p99: f64,
    max: f64,
}

fn quantiles(mut v: Vec<f64>) -> Quantiles {
    if v.is_empty() {
        return Quantiles { p50: f64::NAN, p99: f64::NAN, max: f64::NAN };
    }
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Quantiles { p50: q(0.5), p99: q(0.99), max: v[v.len() - 1] }
}

/// The report, printed as one JSON line.
#[derive(Debug, Serialize)]
pub(crate) struct BenchReport {
    model: String,
    precision: String,
    execution_provider: String,
    images: usize,
    results: usize,
    failed: usize,
    threads: usize,
    sessions: usize,
    spin: bool,
    max_batch: usize,
    decode_workers: usize,
    seconds: f64,
    images_per_s: f64,
    /// Per-stage latency of every result, from the pipeline's own measurements (ms).
    latency_ms: Stages,
}

/// The stages of a result's way, in order (milliseconds).
#[derive(Debug, Serialize)]
struct Stages {
    /// Hashing, decoding, resizing and normalising the photo on a worker thread.
    preprocess: Quantiles,
    /// Waiting for a decode worker, for the batch to fill and for the engine.
    queue: Quantiles,
    /// The batch's inference call.
    infer: Quantiles,
    /// Storing the result durably in the outbox (one transaction per group of results).
    store: Quantiles,
    /// From the pipeline receiving the photo until its result is stored.
    total: Quantiles,
}

impl BenchReport {
    /// A human-readable summary.
    pub(crate) fn table(&self) -> String {
        let mut s = format!(
            "{} ({}, {}): {} images in {:.2} s = {:.1} images/s end to end (decode → infer → outbox → broker PUBACK); \
             {} failed\n\nstage        p50 ms    p99 ms    max ms\n",
            self.model,
            self.precision,
            self.execution_provider,
            self.images,
            self.seconds,
            self.images_per_s,
            self.failed
        );
        let l = &self.latency_ms;
        for (stage, q) in [
            ("preprocess", &l.preprocess),
            ("queue", &l.queue),
            ("infer", &l.infer),
            ("store", &l.store),
            ("total", &l.total),
        ] {
            s += &format!("{stage:<10} {:>8.2}  {:>8.2}  {:>8.2}\n", q.p50, q.p99, q.max);
        }
        s
    }
}

pub(crate) fn run(opts: BenchOptions) -> Result<BenchReport> {
    ensure!(!opts.images.is_empty(), "no images to run on");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("attrd-bench").build()?;
    rt.block_on(run_async(opts))
}

async fn run_async(opts: BenchOptions) -> Result<BenchReport> {
    let cfg = EngineConfig {
        providers: opts.providers.clone(),
        intra_threads: opts.threads,
        sessions: opts.sessions,
        intra_spinning: opts.spin,
        ..EngineConfig::default()
    };
    let bundle = opts.bundle;
    let label = bundle.label();
    let engine = tokio::task::spawn_blocking(move || Engine::load(&bundle, &cfg))
        .await
        .context("engine loading thread")?
        .with_context(|| format!("loading {label}"))?;
    let info = attrd::payload::ModelInfo::of(&engine);
    let engine = Arc::new(ArcSwap::from_pointee(engine));

    let state = tempfile::tempdir().context("creating a temporary state directory")?;
    let outbox = Outbox::open(&OutboxConfig { path: state.path().join("outbox.sqlite3"), ..OutboxConfig::default() })
        .context("opening the outbox")?;
    let (publisher, _commands) = Publisher::start(&opts.mqtt, outbox.clone()).context("starting MQTT")?;
    let mut conn = publisher.state();
    let (host, port) = (&opts.mqtt.host, opts.mqtt.port);
    // The first failed attempt is enough to report: a benchmark should not sit in the reconnect loop.
    let settled = conn.wait_for(|s| s.connection == Connection::Connected || s.connection_errors > 0);
    let _ = tokio::time::timeout(Duration::from_secs(10), settled).await;
    if conn.borrow().connection != Connection::Connected {
        bail!(
            "cannot reach the MQTT broker at {host}:{port}: {}",
            conn.borrow().last_error.as_deref().unwrap_or("no answer in 10 s")
        );
    }
    let topics = publisher.topics().clone();
    let metrics = Metrics::new();

    // Every result passes a tap on its way to the outbox writer that keeps its latencies and times its storing.
    let (finished_tx, mut tap_rx) = mpsc::channel::<Finished>(opts.pipeline.queue.max(1));
    let (writer_tx, writer_rx) = mpsc::channel::<Finished>(opts.pipeline.queue.max(1));
    let writer = tokio::spawn(outbox_writer(writer_rx, outbox.clone(), topics, metrics.clone(), Heartbeat::new()));
    let tap = tokio::spawn(async move {
        let mut stored = tokio::task::JoinSet::new();
        while let Some(mut f) = tap_rx.recv().await {
            let l = f.payload.latency_ms;
            let (tx, rx) = tokio::sync::oneshot::channel();
            let original = std::mem::replace(&mut f.durable, tx);
            let handed = Instant::now();
            if writer_tx.send(f).await.is_err() {
                break;
            }
            stored.spawn(async move {
                let verdict = rx.await.unwrap_or_else(|_| Err(NotStored::Later("the outbox writer stopped".into())));
                let store_ms = handed.elapsed().as_secs_f64() * 1e3;
                let _ = original.send(verdict);
                (l, store_ms)
            });
        }
        stored.join_all().await
    });

    let pipeline = Pipeline::spawn_with_metrics(
        engine,
        opts.pipeline.clone(),
        opts.mqtt.node_name(),
        finished_tx,
        metrics.clone(),
    )
    .context("starting the pipeline")?;
    let n = opts.images.len();
    let started = Instant::now();
    let feeder = {
        let shots = pipeline.shots.clone();
        let images = opts.images.clone();
        tokio::spawn(async move {
            let mut waiting = Vec::with_capacity(images.len());
            for path in images {
                let bytes = tokio::fs::read(&path).await.with_context(|| format!("reading {}", path.display()))?;
                let sku = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                let (shot, rx) = Shot::new(
                    sku,
                    bytes,
                    time::OffsetDateTime::now_utc(),
                    Origin::Hotfolder { source: "bench".into(), path: path.clone(), version: None },
                );
                if shots.send(shot).await.is_err() {
                    bail!("the pipeline stopped");
                }
                waiting.push((path, rx));
            }
            anyhow::Ok(waiting)
        })
    };
    let waiting = feeder.await.context("feeder task")??;
    drop(pipeline.shots);
    let mut failed = 0usize;
    for (path, rx) in waiting {
        match outcome(rx).await {
            ShotOutcome::Durable => {}
            ShotOutcome::Failed(reason) | ShotOutcome::RetryLater(reason) => {
                failed += 1;
                tracing::warn!(path = %path.display(), reason, "photo without a result");
            }
        }
    }
    let drain_until = Instant::now() + DRAIN_TIMEOUT;
    while outbox.depth().messages > 0 {
        ensure!(
            Instant::now() < drain_until,
            "the broker did not acknowledge {} results within {DRAIN_TIMEOUT:?}",
            outbox.depth().messages
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    pipeline.task.await.context("pipeline task")?;
    let samples = tap.await.context("tap task")?;
    writer.await.context("outbox writer task")?;
    publisher.shutdown().await;

    let pick = |f: fn(&(attrd::payload::Latency, f64)) -> f64| quantiles(samples.iter().map(f).collect());
    let latency_ms = Stages {
        preprocess: pick(|(l, _)| l.decode_preprocess),
        queue: pick(|(l, _)| l.queue),
        infer: pick(|(l, _)| l.infer),
        store: pick(|(_, s)| *s),
        total: pick(|(l, s)| l.total + s),
    };
    Ok(BenchReport {
        model: format!("{}-{}", info.name, info.version),
        precision: info.precision.clone(),
        execution_provider: info.execution_provider.clone(),
        images: n,
        results: samples.len(),
        failed,
        threads: opts.threads,
        sessions: opts.sessions,
        spin: opts.spin,
        max_batch: opts.pipeline.max_batch,
        decode_workers: opts.pipeline.decode_workers,
        seconds,
        images_per_s: n as f64 / seconds,
        latency_ms,
    })
}
