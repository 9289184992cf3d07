//! `attrd run`: wires sources → pipeline → outbox → MQTT, the HTTP API, the model store, systemd and signals.
//!
//! Start-up order is chosen so that nothing is accepted before it can be kept: the model is loaded and self-tested,
//! the outbox opened and the publisher started before any source runs, and systemd hears `READY=1` only then.
//! Shutdown runs the other way: sources stop, the pipeline drains into the outbox, the publisher flushes and says
//! `stopped`.

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use attrd::bundle::{Bundle, TrustedKeys};
use attrd::config::Config;
use attrd::engine::Engine;
use attrd::http::{self, CaptureAccepted, CaptureRefusal, CaptureRequest, EngineSource, HttpState};
use attrd::metrics::{Alarm, ErrorKind, Metrics};
use attrd::models::{self, ModelError, ModelStore};
use attrd::mqtt::{IncomingCommand, Publisher, PublisherHandle, Topics};
use attrd::outbox::{NewMessage, Outbox};
use attrd::pipeline::{Finished, NotStored, Pipeline};
use attrd::sources::{self, HeldFrames, ShutdownSignal, Trigger};
use attrd::systemd::{Heartbeat, Notifier};
use attrd::util::{error_chain, now_rfc3339};
use serde_json::json;
use slot::ModelSlot;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};

pub(crate) mod bench;
mod receive;
mod slot;
mod upgrade;

/// How often the retained status message is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// How one configuration's run ended.
enum Outcome {
    /// SIGTERM/SIGINT: the process exits.
    Stopped,
    /// SIGHUP with a changed, valid configuration: everything was drained and runs again with it.
    Reconfigure(Box<Config>),
}

pub async fn run(config_path: PathBuf, cfg: Config, set_log_filter: crate::SetLogFilter) -> Result<()> {
    let started = Instant::now();
    let notifier = Notifier::from_env();
    notifier.status("starting");
    attrd::mqtt::install_crypto_provider();
    let mut cfg = cfg;
    // Camera frames whose results could not be stored yet outlive a reload here (they exist nowhere else; the outbox
    // database keeps them across restarts).
    let held = HeldFrames::default();
    // Kept across reloads, so a SIGTERM during a reload's drain is not lost with the streams of the run that ended.
    // SIGHUP's is installed now (its default action would kill the process before the first READY); SIGTERM's and
    // SIGINT's at the first READY, so until then a stop ends the start-up at once, as their default action does.
    let mut signals = Signals::install()?;
    loop {
        match serve(&config_path, &cfg, notifier, started, &held, &mut signals).await? {
            Outcome::Stopped => {
                report_held_at_stop(&held);
                return Ok(());
            }
            Outcome::Reconfigure(new) => {
                if std::env::var_os("ATTRD_LOG").is_none()
                    && new.log.filter != cfg.log.filter
                    && let Err(e) = set_log_filter(&new.log.filter)
                {
                    tracing::warn!(error = %e, "log filter not changed");
                }
                cfg = *new;
                if signals.stop_requested() {
                    tracing::info!("stop requested during the reload's drain; not starting again");
                    report_held_at_stop(&held);
                    return Ok(());
                }
                tracing::info!(config = %config_path.display(), "configuration reloaded; starting again with it");
            }
        }
    }
}

/// Names what becomes of the camera frames still held when the process ends.
fn report_held_at_stop(held: &HeldFrames) {
    let (kept, lost): (Vec<_>, Vec<_>) = held.take().into_iter().partition(|f| f.is_kept());
    if !kept.is_empty() {
        tracing::warn!(
            frames = kept.len(),
            "camera frames whose results are not stored yet stay in the outbox database; the next start sends them \
             again"
        );
    }
    if !lost.is_empty() {
        let skus: Vec<&str> = lost.iter().map(|f| f.sku()).collect();
        tracing::error!(frames = lost.len(), skus = ?skus, "stopping with camera frames that could be stored neither \
            as results nor on disk: they are lost (take them again)");
    }
}

/// The daemon's signal streams, for the life of the process.
struct Signals {
    hup: Signal,
    /// SIGTERM's and SIGINT's, from the first READY on.
    stop: Option<(Signal, Signal)>,
}

impl Signals {
    fn install() -> Result<Self> {
        Ok(Self { hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?, stop: None })
    }

    /// SIGTERM's, SIGINT's and SIGHUP's streams, installing the first two on first use.
    fn all(&mut self) -> Result<(&mut Signal, &mut Signal, &mut Signal)> {
        if self.stop.is_none() {
            self.stop = Some((
                signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
                signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            ));
        }
        match &mut self.stop {
            Some((term, int)) => Ok((term, int, &mut self.hup)),
            None => unreachable!("installed just above"),
        }
    }

    /// Whether SIGTERM or SIGINT arrived since they were last looked at, without waiting.
    fn stop_requested(&mut self) -> bool {
        let Some((term, int)) = &mut self.stop else { return false };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let term = term.poll_recv(&mut cx).is_ready();
        let int = int.poll_recv(&mut cx).is_ready();
        term || int
    }
}

/// Checks a re-read configuration against the running one: `Ok(None)` when nothing changed, `Ok(Some)` when it
/// can be applied (by an in-process restart), `Err` when it cannot be applied at all, in which case nothing is.
fn reconfiguration(path: &Path, current: &Config) -> Result<Option<Config>> {
    let new = Config::load(path).with_context(|| format!("re-reading {}", path.display()))?;
    if new == *current {
        return Ok(None);
    }
    if new.log.format != current.log.format {
        bail!("log.format cannot change while running (the log stream's format is fixed at start); restart attrd");
    }
    if new.engine.ort_library != current.engine.ort_library {
        bail!(
            "engine.ort_library cannot change while running (ONNX Runtime is loaded once per process); restart attrd"
        );
    }
    if new.demo.spawn_broker != current.demo.spawn_broker {
        bail!("demo.spawn_broker cannot change while running; restart attrd");
    }
    Ok(Some(new))
}

/// Runs the daemon with one configuration until a stop signal or an applicable reload.
async fn serve(
    config_path: &Path,
    cfg: &Config,
    notifier: Notifier,
    started: Instant,
    held: &HeldFrames,
    signals: &mut Signals,
) -> Result<Outcome> {
    let node = cfg.mqtt.node_name();
    let _broker =
        if cfg.demo.spawn_broker { Some(SpawnedBroker::start(cfg).context("starting the demo broker")?) } else { None };
    seed_demo_images(cfg)?;

    // The model first: without one that passed its self-test there is nothing to serve.
    let store = open_store(cfg)?;
    // Activation self-tests the model, which blocks on the inference thread: keep it off the async workers.
    let (s, c) = (store.clone(), cfg.clone());
    tokio::task::spawn_blocking(move || bootstrap(&s, &c)).await.context("bootstrap thread")??;
    let (active, engine, report, fallback) = start_model(&store, cfg, &notifier).await?;
    tracing::info!(model = %active.label(), provider = %report.provider, golden = report.golden_items,
        max_abs_diff = report.max_abs_diff, cpu_max_abs_diff = report.cpu_max_abs_diff, "model ready");
    let metrics = Metrics::new();
    if let Some(reason) = &fallback {
        metrics.raise(Alarm::ModelFallback, reason);
    }
    metrics.set_model(&engine);
    let engine = Arc::new(ArcSwap::from_pointee(engine));

    let outbox = Outbox::open(&cfg.outbox).context("opening the outbox")?;
    match held.attach(&outbox).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(frames = n, "camera frames kept from before the restart are sent again"),
        Err(e) => tracing::error!(error = %error_chain(&e), "cannot read the camera frames kept in the outbox; they \
            stay there and are tried again at the next start"),
    }
    let (mut publisher, commands) = Publisher::start(&cfg.mqtt, outbox.clone()).context("starting MQTT")?;
    let mqtt = publisher.handle();
    let topics = publisher.topics().clone();
    let slot = Arc::new(ModelSlot::new(engine.clone(), active.clone(), report, metrics.clone(), mqtt.clone()));
    slot.publish();
    upgrade::spawn(slot.clone(), active, &cfg.engine);
    let receiver_task = publisher.take_model_messages().filter(|_| !cfg.models.receive.is_empty()).map(|rx| {
        let connection = publisher.state();
        tokio::spawn(receive::run(rx, store.clone(), cfg.models.clone(), cfg.engine.clone(), slot.clone(), connection))
    });

    let (finished_tx, finished_rx) = mpsc::channel::<Finished>(cfg.pipeline.queue.max(1));
    let pipeline =
        Pipeline::spawn_with_metrics(engine.clone(), cfg.pipeline.clone(), node.clone(), finished_tx, metrics.clone())
            .context("starting the pipeline")?;
    let heartbeat = Heartbeat::new();
    let writer =
        tokio::spawn(outbox_writer(finished_rx, outbox.clone(), topics.clone(), metrics.clone(), heartbeat.clone()));

    let mut built = sources::build(&cfg.sources, held, Some(&outbox)).context("configuring sources")?;
    built.sources.extend(held.source());
    let triggers = built.triggers;
    let stop_sources = ShutdownSignal::new();
    let sources_task = tokio::spawn(sources::run_all(built.sources, pipeline.shots.clone(), stop_sources.subscribe()));

    let (capture_tx, capture_rx) = mpsc::channel::<CaptureRequest>(16);
    let capture_task = tokio::spawn(route_captures(capture_rx, triggers));
    let commands_task = tokio::spawn(handle_commands(commands, mqtt.clone(), capture_tx.clone()));

    let (ready_tx, ready_rx) = watch::channel(false);
    let (http_stop_tx, mut http_stop_rx) = watch::channel(false);
    // The token in force for this run, to notice a rotated token file on SIGHUP.
    let token = if cfg.http.enabled { cfg.http.resolve_token().context("reading the HTTP token")? } else { None };
    let http_task = if cfg.http.enabled {
        let e = engine.clone();
        let source: EngineSource = Arc::new(move || Some(e.load_full()));
        let state = HttpState::new(&cfg.http, source, metrics.clone(), ready_rx)?
            .with_capture(capture_tx.clone())
            .with_pipeline(&pipeline.shots)
            .with_limits(cfg.pipeline.limits);
        let listener = http::bind(&cfg.http).await.context("binding the HTTP API")?;
        let stop = async move {
            let _ = http_stop_rx.wait_for(|s| *s).await;
        };
        Some(tokio::spawn(http::serve_on(listener, http::router(state), stop)))
    } else {
        None
    };
    drop(capture_tx);

    let status_task = tokio::spawn(publish_status(
        mqtt.clone(),
        topics.clone(),
        engine.clone(),
        (outbox.clone(), cfg.outbox.clone()),
        publisher.state(),
        metrics.clone(),
        started,
    ));
    let (wd_stop, wd_stop_rx) = watch::channel(false);
    let watchdog = notifier.watchdog_interval().map(|interval| {
        tokio::spawn(idle_self_inference(engine.clone(), heartbeat.clone(), interval, wd_stop_rx.clone()));
        tokio::spawn(attrd::systemd::run_watchdog(notifier, heartbeat.clone(), interval, async move {
            let mut rx = wd_stop_rx;
            let _ = rx.wait_for(|s| *s).await;
        }))
    });

    let _ = ready_tx.send(true);
    heartbeat.beat();
    notifier.ready();
    let label = slot.label();
    notifier.status(&format!("serving {label} on {}", engine.load().providers().active));
    tracing::info!(node = %node, startup_ms = started.elapsed().as_millis() as u64, "attrd ready");

    // Signals: TERM/INT stop; HUP re-reads the configuration (all or nothing) and the model store's active bundle.
    let (term, int, hup) = signals.all()?;
    let outcome = loop {
        tokio::select! {
            _ = term.recv() => break Outcome::Stopped,
            _ = int.recv() => break Outcome::Stopped,
            _ = hup.recv() => {
                notifier.reloading();
                match reconfiguration(config_path, cfg) {
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "reload refused; nothing of the new configuration was applied");
                        notifier.status(&format!("reload refused: {e:#}"));
                    }
                    Ok(Some(new)) => break Outcome::Reconfigure(Box::new(new)),
                    // The same settings, but a token file with a new token in it (a rotation): applied like any
                    // other change, so `systemctl reload` rotates it.
                    Ok(None) if cfg.http.enabled && matches!(cfg.http.resolve_token(), Ok(t) if t != token) => {
                        tracing::info!("http token file changed; starting again with the new token");
                        break Outcome::Reconfigure(Box::new(cfg.clone()));
                    }
                    Ok(None) => {
                        // A model load and self-test can take a while; a stop request meanwhile is not kept waiting.
                        tokio::select! {
                            r = reload(cfg, &slot) => if let Err(e) = r {
                                tracing::error!(error = %format!("{e:#}"), "model reload failed; the running model stays");
                            },
                            _ = term.recv() => break Outcome::Stopped,
                            _ = int.recv() => break Outcome::Stopped,
                        }
                    }
                }
                notifier.ready();
            }
        }
    };

    // Graceful shutdown (or drain before a restart with a new configuration), bounded by the configured deadline.
    let restarting = matches!(outcome, Outcome::Reconfigure(_));
    tracing::info!(restarting, "shutting down");
    if !restarting {
        notifier.stopping();
    }
    let _ = ready_tx.send(false);
    let drain = async {
        stop_sources.trigger();
        let _ = sources_task.await;
        // The pipeline ends once every sender of shots is gone: sources are done, drop ours.
        let Pipeline { shots, task, .. } = pipeline;
        drop(shots);
        let _ = task.await;
        let _ = writer.await;
        if restarting {
            publisher.shutdown_for_restart().await;
        } else {
            publisher.shutdown().await;
        }
    };
    let drained = tokio::time::timeout(cfg.shutdown_timeout, drain).await.is_ok();
    if !drained {
        tracing::warn!(timeout = ?cfg.shutdown_timeout, "shutdown deadline passed; unfinished work stays in the sources and the outbox");
    }
    let _ = http_stop_tx.send(true);
    let _ = wd_stop.send(true);
    if let Some(mut h) = http_task
        && tokio::time::timeout(Duration::from_secs(2), &mut h).await.is_err()
    {
        // Connections still open after the grace period are cut, so the port is free for a restart.
        h.abort();
        let _ = h.await;
    }
    drop(watchdog);
    status_task.abort();
    commands_task.abort();
    if let Some(t) = receiver_task {
        t.abort();
    }
    capture_task.abort();
    held.detach();
    tracing::info!(restarting, "attrd stopped");
    if restarting && !drained {
        // The tasks the drain was waiting for still run, detached: a second instance beside them would share the hot
        // folders, the outbox and the MQTT client id. A fresh process is the clean way to apply the configuration,
        // and nothing is lost by it (the same as after a kill -9).
        bail!(
            "the drain before applying the new configuration did not finish within shutdown_timeout ({:?}); exiting \
             so that systemd starts attrd afresh with it. Unfinished photos stay with their sources, results in the \
             outbox",
            cfg.shutdown_timeout
        );
    }
    Ok(outcome)
}

fn open_store(cfg: &Config) -> Result<ModelStore> {
    let keys = TrustedKeys::from_files(&cfg.models.trusted_keys).context("loading models.trusted_keys")?;
    ModelStore::open(&cfg.models.dir, keys, false)
        .with_context(|| format!("opening models directory {}", cfg.models.dir.display()))
}

/// Installs and activates `models.bootstrap` when nothing is active yet (a fresh box, the demo).
fn bootstrap(store: &ModelStore, cfg: &Config) -> Result<()> {
    if store.state()?.active.is_some() {
        return Ok(());
    }
    let Some(src) = &cfg.models.bootstrap else { return Ok(()) };
    let id = match store.install(src) {
        Ok(b) => dir_name(b.dir()),
        // Installed by an earlier start whose activation failed (from a directory or an archive alike).
        Err(ModelError::AlreadyInstalled { id, .. }) => id,
        Err(e) => return Err(e).with_context(|| format!("installing bootstrap bundle {}", src.display())),
    };
    store.activate(&id, &cfg.engine.foreground()).with_context(|| format!("activating bootstrap bundle {id}"))?;
    Ok(())
}

/// The active bundle, loaded and self-tested. When it cannot serve, the previous bundles are tried in turn
/// (`ModelStore::fall_back`), so a box keeps serving a model it served before; the reason comes back with the one
/// that serves, for the `model_fallback` alarm.
async fn start_model(
    store: &ModelStore,
    cfg: &Config,
    notifier: &Notifier,
) -> Result<(Bundle, Engine, models::SelfTestReport, Option<String>)> {
    let failure = match store.active() {
        Ok(b) => {
            notifier.status(&format!("self-testing {}", b.label()));
            match load_and_test(b.clone(), cfg).await {
                Ok((engine, report)) => return Ok((b, engine, report, None)),
                Err(e) => e,
            }
        }
        Err(ModelError::NoneActive) => {
            bail!("no model is active; install one with `attrd model install --activate`")
        }
        Err(e) => anyhow::Error::from(e).context("opening the active model"),
    };
    let failed = store.state().ok().and_then(|s| s.active).unwrap_or_default();
    tracing::error!(model = %failed, error = %format!("{failure:#}"), "the active model cannot serve; trying the previous ones");
    notifier.status(&format!("{failed} cannot serve; trying the previous models"));
    let (s, engine_cfg) = (store.clone(), cfg.engine.foreground());
    match tokio::task::spawn_blocking(move || s.fall_back(&engine_cfg)).await.context("fallback thread")? {
        Ok((b, engine, report)) => {
            let id = dir_name(b.dir());
            let reason = format!("{failed} cannot serve ({failure:#}); the previous model {id} serves instead");
            tracing::error!(alarm = Alarm::ModelFallback.as_str(), "ALARM {reason}");
            Ok((b, engine, report, Some(reason)))
        }
        Err(ModelError::NoPrevious) => Err(failure),
        Err(e) => Err(failure.context(format!("no previous model can serve either (the last: {})", error_chain(&e)))),
    }
}

fn dir_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

async fn load_and_test(bundle: Bundle, cfg: &Config) -> Result<(Engine, models::SelfTestReport)> {
    // Slow providers are built afterwards in the background (upgrade.rs); serve with the rest of the chain first.
    let engine_cfg = cfg.engine.foreground();
    let label = bundle.label();
    tokio::task::spawn_blocking(move || models::load_and_test(&bundle, &engine_cfg))
        .await
        .context("model loading thread")?
        .with_context(|| format!("loading {label}"))
}

/// Results taken from the pipeline into one outbox transaction at most; the pipeline's batches are smaller.
const OUTBOX_GROUP: usize = 64;

/// Stores each finished result durably and tells the pipeline (and so the source) that it is safe. Whatever results
/// are waiting are stored together in one transaction: one fsync per group instead of one per result.
async fn outbox_writer(
    mut rx: mpsc::Receiver<Finished>,
    outbox: Outbox,
    topics: Topics,
    metrics: Metrics,
    heartbeat: Heartbeat,
) {
    let mut group = Vec::with_capacity(OUTBOX_GROUP);
    while rx.recv_many(&mut group, OUTBOX_GROUP).await > 0 {
        // A result means the inference path is alive.
        heartbeat.beat();
        let mut msgs = Vec::with_capacity(group.len());
        let mut prepared = Vec::with_capacity(group.len());
        for f in &group {
            // Neither refusal can change on a retry.
            let msg = topics.result(&f.payload.sku).map_err(|e| NotStored::Never(e.to_string())).and_then(|topic| {
                let payload = serde_json::to_value(&f.payload).map_err(|e| NotStored::Never(e.to_string()))?;
                Ok(NewMessage {
                    topic,
                    payload,
                    qos: 1,
                    retain: false,
                    message_id: result_id(f),
                    covers: f.covers.clone(),
                    releases: f.releases.clone(),
                })
            });
            prepared.push(match msg {
                Ok(m) => {
                    msgs.push(m);
                    Ok(())
                }
                Err(e) => Err(e),
            });
        }
        let storing = std::time::Instant::now();
        let mut stored = outbox.enqueue_many(msgs).await.into_iter();
        let store_time = storing.elapsed();
        for (f, prep) in group.drain(..).zip(prepared) {
            let outcome = match prep {
                Err(e) => Err(e),
                Ok(()) => match stored.next() {
                    Some(Ok(stored)) => {
                        observe_latency(&metrics, &f.payload.latency_ms, store_time);
                        if stored.dropped > 0 {
                            outbox_dropping(&metrics, stored.dropped);
                        } else {
                            outbox_alarms(&metrics, None);
                        }
                        Ok(())
                    }
                    Some(Err(e)) => {
                        outbox_alarms(&metrics, Some(&e));
                        if e.refuses_the_message() {
                            Err(NotStored::Never(error_chain(&e)))
                        } else {
                            Err(NotStored::Later(error_chain(&e)))
                        }
                    }
                    None => Err(NotStored::Later("the outbox gave no verdict".to_string())),
                },
            };
            match &outcome {
                Err(NotStored::Later(e)) => {
                    tracing::error!(sku = %f.payload.sku, error = %e, "result not stored; the source keeps the photo")
                }
                Err(NotStored::Never(e)) => {
                    tracing::error!(sku = %f.payload.sku, error = %e, "result can never be stored; its photos fail")
                }
                Ok(()) => {}
            }
            let _ = f.durable.send(outcome);
        }
        let d = outbox.depth();
        metrics.set_outbox(d.messages, d.bytes);
    }
}

/// Counts results the full outbox deleted to store a new one (policy `drop_oldest`), and keeps `outbox_full` raised
/// for as long as it does: results are being lost, which the operator must hear about.
fn outbox_dropping(metrics: &Metrics, dropped: u64) {
    metrics.results_dropped(dropped);
    metrics.error(ErrorKind::OutboxFull);
    // It stored this result, so it is writable.
    clear_outbox_alarm(metrics, Alarm::OutboxUnwritable);
    let reason = "the outbox is full and deletes its oldest unpublished results to store new ones \
                  (outbox.when_full = drop_oldest)";
    if metrics.raise(Alarm::OutboxFull, reason) {
        tracing::error!(
            alarm = Alarm::OutboxFull.as_str(),
            dropped,
            "ALARM results are being lost: {reason}. Bring the broker back, or raise outbox.max_messages / max_bytes."
        );
    }
}

/// Raises the outbox alarms on a failed store (once, at error level) and clears them on the next success.
fn outbox_alarms(metrics: &Metrics, failure: Option<&attrd::outbox::OutboxError>) {
    use attrd::outbox::OutboxError;
    let Some(e) = failure else {
        for alarm in [Alarm::OutboxUnwritable, Alarm::OutboxFull] {
            clear_outbox_alarm(metrics, alarm);
        }
        return;
    };
    let reason = error_chain(e);
    let (alarm, kind) = match e {
        OutboxError::Full { .. } => (Alarm::OutboxFull, ErrorKind::OutboxFull),
        // A message the outbox refuses on its own merits says nothing about the outbox's health.
        OutboxError::TooLarge { .. }
        | OutboxError::NotAnObject(_)
        | OutboxError::InvalidTopic(_)
        | OutboxError::InvalidQos(_) => {
            metrics.error(ErrorKind::Outbox);
            return;
        }
        _ => (Alarm::OutboxUnwritable, ErrorKind::Outbox),
    };
    metrics.error(kind);
    if metrics.raise(alarm, &reason) {
        tracing::error!(alarm = alarm.as_str(), error = %reason,
            "ALARM results cannot be stored in the outbox; photos stay with their sources and are retried, nothing is \
             lost. Check the state directory's disk space and permissions (or the broker, if the outbox is full).");
    }
}

fn clear_outbox_alarm(metrics: &Metrics, alarm: Alarm) {
    if let Some(r) = metrics.clear(alarm) {
        tracing::info!(alarm = alarm.as_str(), since = %r.since, "alarm cleared: the outbox stores results again");
    }
}

/// Feeds a stored result's per-stage latency (measured by the pipeline, in its payload) into `attrd_stage_seconds`;
/// `publish` is the time to store it durably in the outbox, and `total` runs until then.
fn observe_latency(metrics: &Metrics, l: &attrd::payload::Latency, store: Duration) {
    use attrd::metrics::Stage;
    let d = |ms: f64| Duration::from_secs_f64((ms / 1000.0).max(0.0));
    metrics.observe_stage(Stage::Preprocess, d(l.decode_preprocess));
    metrics.observe_stage(Stage::Queue, d(l.queue));
    metrics.observe_stage(Stage::Infer, d(l.infer));
    metrics.observe_stage(Stage::Publish, store);
    metrics.observe_stage(Stage::Total, d(l.total) + store);
}

/// The `message_id` of a result: derived from what it is about (node, SKU, the photos by hash, the model), so a photo
/// processed again after a crash carries the same id and subscribers can drop the repeat.
fn result_id(f: &Finished) -> uuid::Uuid {
    let p = &f.payload;
    let mut photos: Vec<&str> = std::iter::once(p.source.image_sha256.as_str())
        .chain(p.views.iter().map(|v| v.source.image_sha256.as_str()))
        .collect();
    photos.sort_unstable();
    photos.dedup();
    let key = format!("{}\n{}\n{}\n{}", p.node, p.sku, photos.join(","), p.model.sha256);
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, key.as_bytes())
}

/// Turns capture requests (HTTP or MQTT) into camera triggers.
async fn route_captures(mut rx: mpsc::Receiver<CaptureRequest>, triggers: BTreeMap<String, mpsc::Sender<Trigger>>) {
    while let Some(req) = rx.recv().await {
        let result = if triggers.is_empty() {
            Err(CaptureRefusal::NoCameras)
        } else {
            let wanted: Vec<String> =
                if req.cameras.is_empty() { triggers.keys().cloned().collect() } else { req.cameras.clone() };
            let unknown: Vec<String> = wanted.iter().filter(|c| !triggers.contains_key(*c)).cloned().collect();
            if !unknown.is_empty() {
                Err(CaptureRefusal::UnknownCameras { unknown, configured: triggers.keys().cloned().collect() })
            } else {
                let mut done = Vec::new();
                let mut failed = None;
                for c in &wanted {
                    match triggers[c].try_send(Trigger { sku: req.sku.clone() }) {
                        Ok(()) => done.push(c.clone()),
                        Err(e) => failed = Some(format!("camera {c}: {e}")),
                    }
                }
                match failed {
                    Some(reason) if done.is_empty() => Err(CaptureRefusal::Unavailable(reason)),
                    _ => Ok(CaptureAccepted { cameras: done }),
                }
            }
        };
        let _ = req.reply.send(result);
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptureCommand {
    sku: String,
    #[serde(default)]
    cameras: Vec<String>,
}

/// Commands arriving on `attrd/<node>/cmd/<kind>`; every one gets a reply on its response topic.
async fn handle_commands(
    mut rx: mpsc::Receiver<IncomingCommand>,
    mqtt: PublisherHandle,
    capture: mpsc::Sender<CaptureRequest>,
) {
    while let Some(cmd) = rx.recv().await {
        let reply = match cmd.kind.as_str() {
            "capture" => match serde_json::from_value::<CaptureCommand>(cmd.payload.clone()) {
                Err(e) => {
                    json!({"ok": false, "error": format!("malformed capture command: {e}; expected {{\"sku\": \"…\", \"cameras\": [\"…\"]}}")})
                }
                Ok(c) => match http::validate_sku(&c.sku) {
                    Err(e) => json!({"ok": false, "error": e}),
                    Ok(()) => {
                        let sku = c.sku;
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let req = CaptureRequest { sku: sku.clone(), cameras: c.cameras, reply: tx };
                        match capture.send(req).await {
                            Err(_) => json!({"ok": false, "error": "capture is shutting down"}),
                            Ok(()) => match rx.await {
                                Ok(Ok(a)) => json!({"ok": true, "sku": sku, "cameras": a.cameras}),
                                Ok(Err(r)) => json!({"ok": false, "error": r.to_string()}),
                                Err(_) => json!({"ok": false, "error": "capture side did not answer"}),
                            },
                        }
                    }
                },
            },
            other => json!({"ok": false, "error": format!("unknown command {other:?}; known: capture")}),
        };
        if let Err(e) = mqtt.respond(cmd.response_topic.clone(), &reply) {
            tracing::warn!(error = %e, "could not queue a command reply");
        }
    }
}

pub(crate) fn model_json(engine: &Engine) -> serde_json::Value {
    let mut v = serde_json::to_value(attrd::payload::ModelInfo::of(engine)).unwrap_or_default();
    v["fallbacks"] = serde_json::to_value(&engine.providers().fallbacks).unwrap_or_default();
    v
}

async fn publish_status(
    mqtt: PublisherHandle,
    topics: Topics,
    engine: Arc<ArcSwap<Engine>>,
    (outbox, limits): (Outbox, attrd::outbox::OutboxConfig),
    mut conn: watch::Receiver<attrd::mqtt::PublisherState>,
    metrics: Metrics,
    started: Instant,
) {
    let mut tick = tokio::time::interval(STATUS_EVERY);
    let mut last = None;
    // `attrd_errors_total{kind="mqtt"}` follows the publisher's count of failed connections and lost ones.
    let mut counted_errors = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = conn.changed() => {
                if changed.is_err() {
                    return;
                }
                // The state's counters change with every published result; only a new connection state is news.
                if last == Some(conn.borrow_and_update().connection) {
                    continue;
                }
            }
        }
        // `outbox_full` is raised by a store that met a full outbox; once the publisher has drained it below 90 %,
        // the cause is gone even if no new result comes to clear it.
        let d = outbox.depth();
        if d.messages.saturating_mul(10) < limits.max_messages.saturating_mul(9)
            && d.bytes.saturating_mul(10) < limits.max_bytes.saturating_mul(9)
            && let Some(r) = metrics.clear(Alarm::OutboxFull)
        {
            tracing::info!(alarm = Alarm::OutboxFull.as_str(), since = %r.since, messages = d.messages,
                "alarm cleared: the outbox has room again");
        }
        let (connection, errors) = {
            let s = conn.borrow_and_update();
            (s.connection, s.connection_errors)
        };
        metrics.errors(ErrorKind::Mqtt, errors.saturating_sub(counted_errors));
        counted_errors = counted_errors.max(errors);
        last = Some(connection);
        let connected = matches!(connection, attrd::mqtt::Connection::Connected);
        metrics.set_mqtt_connected(connected);
        let d = outbox.depth();
        metrics.set_outbox(d.messages, d.bytes);
        let payload = json!({
            "node": topics.node(),
            "attrd_version": env!("CARGO_PKG_VERSION"),
            "model": model_json(&engine.load()),
            "uptime_s": started.elapsed().as_secs(),
            "outbox": {"messages": d.messages, "bytes": d.bytes, "oldest_age_s": d.oldest_age.map(|a| a.as_secs())},
            "alarms": metrics.alarms(),
            "at": now_rfc3339(),
        });
        let _ = mqtt.publish_retained(topics.status(), &payload);
    }
}

/// While no photos arrive, a tiny inference keeps proving that the engine answers, so the watchdog only fires when
/// the engine is really stuck.
async fn idle_self_inference(
    engine: Arc<ArcSwap<Engine>>,
    heartbeat: Heartbeat,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval / 4);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !heartbeat.needs_self_test(interval) {
            continue;
        }
        let e = engine.load_full();
        let [a, b, c] = e.input_shape();
        let batch = ndarray::Array4::<f32>::zeros((1, a, b, c));
        match e.infer(batch).await {
            Ok(_) => heartbeat.beat(),
            Err(err) => tracing::error!(error = %err, "idle self-inference failed"),
        }
    }
}

/// SIGHUP with an unchanged configuration: switch to the model store's active bundle if it changed (after
/// `attrd model activate` or `rollback`), without interrupting anything.
async fn reload(cfg: &Config, slot: &Arc<ModelSlot>) -> Result<()> {
    // Opening the active bundle hashes its files: not on the async workers.
    let c = cfg.clone();
    let active = tokio::task::spawn_blocking(move || -> Result<Bundle> { Ok(open_store(&c)?.active()?) })
        .await
        .context("model store thread")??;
    if slot.is_current(&active) {
        tracing::info!("configuration re-read; active model unchanged");
        return Ok(());
    }
    let (new_engine, report) = load_and_test(active.clone(), cfg).await?;
    slot.swap(new_engine, report, active.clone());
    upgrade::spawn(slot.clone(), active, &cfg.engine);
    Ok(())
}

/// Copies the demo's sample photos into the first hot folder (demo configurations only).
fn seed_demo_images(cfg: &Config) -> Result<()> {
    let Some(src) = &cfg.demo.seed_hotfolder else { return Ok(()) };
    let Some(dir) = cfg.sources.iter().find_map(|s| match s {
        sources::SourceConfig::Hotfolder(h) => Some(h.dir.clone()),
        _ => None,
    }) else {
        bail!("demo.seed_hotfolder is set but no hot folder is configured");
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut n = 0;
    for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let p = e?.path();
        if p.is_file() {
            std::fs::copy(&p, dir.join(p.file_name().unwrap_or_default()))?;
            n += 1;
        }
    }
    tracing::info!(images = n, dir = %dir.display(), "demo: hot folder seeded with sample photos");
    Ok(())
}

/// A private mosquitto for the demo, stopped when the daemon exits.
struct SpawnedBroker {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl SpawnedBroker {
    fn start(cfg: &Config) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("mosquitto.conf");
        let host = if cfg.mqtt.host == "localhost" { "127.0.0.1" } else { cfg.mqtt.host.as_str() };
        std::fs::write(&conf, format!("listener {} {host}\nallow_anonymous true\npersistence false\n", cfg.mqtt.port))?;
        let child = std::process::Command::new(&cfg.demo.mosquitto)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("running {} (install Debian's mosquitto)", cfg.demo.mosquitto.display()))?;
        tracing::info!(port = cfg.mqtt.port, pid = child.id(), "demo broker started");
        Ok(Self { child, _dir: dir })
    }
}

impl Drop for SpawnedBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
