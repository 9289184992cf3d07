//! Background sessions for providers that take long to build (`engine.build_in_background`, TensorRT by default):
//! the daemon serves with the rest of the chain at once, builds the preferred provider's session beside it, runs the
//! golden set on it and only then swaps it in. Progress is logged and published in `model/state` under `background`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use attrd::bundle::Bundle;
use attrd::engine::{Engine, EngineConfig};
use attrd::models;
use attrd::util::{error_chain, now_rfc3339};
use serde_json::json;

use super::slot::ModelSlot;

/// How often a running build is reported.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Starts building `bundle` on `cfg`'s deferred provider, if it has one.
pub(crate) fn spawn(slot: Arc<ModelSlot>, bundle: Bundle, cfg: &EngineConfig) -> Option<tokio::task::JoinHandle<()>> {
    let provider = cfg.deferred()?;
    let cfg = cfg.clone();
    Some(tokio::spawn(async move {
        let started = Instant::now();
        let label = bundle.label();
        let event = |status: &str, error: Option<String>| {
            json!({
                "provider": provider,
                "model": label,
                "status": status,
                "elapsed_s": started.elapsed().as_secs(),
                "error": error,
                "at": now_rfc3339(),
            })
        };
        tracing::info!(provider = %provider, model = %label, serving = %slot.provider(),
            "building the preferred provider's session in the background");
        slot.background_event(event("building", None));
        let b = bundle.clone();
        let (tx, mut build) = tokio::sync::oneshot::channel();
        // A plain thread, not the blocking pool: a shutdown must not wait minutes for an engine build to finish.
        let spawned = std::thread::Builder::new().name("attrd-bg-build".into()).spawn(move || {
            let r = Engine::load_on(&b, &cfg, provider).map_err(|e| error_chain(&e)).and_then(|engine| {
                let report = models::self_test(&b, &engine).map_err(|e| error_chain(&e))?;
                Ok((engine, report))
            });
            let _ = tx.send(r);
        });
        if let Err(e) = spawned {
            slot.background_event(event("failed", Some(format!("cannot start the build thread: {e}"))));
            return;
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let outcome = loop {
            tokio::select! {
                r = &mut build => break r.map_err(|_| "the build thread ended without a result".to_string()).and_then(|r| r),
                _ = tick.tick() => {
                    tracing::info!(provider = %provider, model = %label, elapsed_s = started.elapsed().as_secs(),
                        "background session still building");
                    slot.background_event(event("building", None));
                }
            }
        };
        match outcome {
            // Another model may have been activated meanwhile; its own build replaces this one.
            Ok(_) if !slot.is_current(&bundle) => {
                tracing::info!(provider = %provider, model = %label, "background session discarded: model changed");
            }
            Ok((engine, report)) => {
                tracing::info!(provider = %provider, model = %label, build_s = started.elapsed().as_secs_f32(),
                    max_abs_diff = report.max_abs_diff, cpu_max_abs_diff = report.cpu_max_abs_diff,
                    "background session ready; swapping");
                slot.swap(engine, report, bundle);
                slot.background_event(event("ready", None));
            }
            Err(e) => {
                tracing::warn!(provider = %provider, model = %label, error = %e, serving = %slot.provider(),
                    "background session failed; serving stays on the current provider");
                slot.background_event(event("failed", Some(e)));
            }
        }
    }))
}
