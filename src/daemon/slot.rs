//! The serving model: one place that swaps the engine, updates metrics and publishes `model/state`, whoever
//! triggered the change (SIGHUP, a bundle received over MQTT).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use attrd::bundle::Bundle;
use attrd::engine::Engine;
use attrd::metrics::{Alarm, Metrics};
use attrd::models::SelfTestReport;
use attrd::mqtt::PublisherHandle;
use attrd::util::now_rfc3339;
use serde_json::{Value, json};

pub(crate) struct ModelSlot {
    engine: Arc<ArcSwap<Engine>>,
    metrics: Metrics,
    mqtt: PublisherHandle,
    inner: Mutex<Inner>,
}

struct Inner {
    bundle: Bundle,
    report: SelfTestReport,
    /// The latest bundle transfer over MQTT (receiving, installed, activated, rejected), shown in `model/state`.
    transfer: Option<Value>,
    /// The latest background session build (building, ready, failed).
    background: Option<Value>,
}

impl ModelSlot {
    pub(crate) fn new(
        engine: Arc<ArcSwap<Engine>>,
        bundle: Bundle,
        report: SelfTestReport,
        metrics: Metrics,
        mqtt: PublisherHandle,
    ) -> Self {
        Self { engine, metrics, mqtt, inner: Mutex::new(Inner { bundle, report, transfer: None, background: None }) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain data behind (no invariant spans fields), so keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn mqtt(&self) -> &PublisherHandle {
        &self.mqtt
    }

    /// The execution provider serving now.
    pub(crate) fn provider(&self) -> String {
        self.engine.load().providers().active.to_string()
    }

    pub(crate) fn label(&self) -> String {
        self.lock().bundle.label()
    }

    pub(crate) fn current_dir(&self) -> PathBuf {
        self.lock().bundle.dir().to_owned()
    }

    pub(crate) fn is_current(&self, b: &Bundle) -> bool {
        self.current_dir() == b.dir()
    }

    /// Serves `engine` from now on. In-flight batches keep the engine they took; new batches get this one.
    pub(crate) fn swap(&self, engine: Engine, report: SelfTestReport, bundle: Bundle) {
        let label = bundle.label();
        let provider = report.provider.clone();
        if !self.is_current(&bundle)
            && let Some(r) = self.metrics.clear(Alarm::ModelFallback)
        {
            tracing::info!(alarm = Alarm::ModelFallback.as_str(), since = %r.since, model = %label, "alarm cleared: another model was activated");
        }
        self.metrics.set_model(&engine);
        self.engine.store(Arc::new(engine));
        {
            let mut g = self.lock();
            g.bundle = bundle;
            g.report = report;
        }
        self.publish();
        tracing::info!(model = %label, provider = %provider, "model swapped");
    }

    /// Records the latest transfer event and publishes it with the state.
    pub(crate) fn transfer_event(&self, event: Value) {
        self.lock().transfer = Some(event);
        self.publish();
    }

    /// Records the latest background build event and publishes it with the state.
    pub(crate) fn background_event(&self, event: Value) {
        self.lock().background = Some(event);
        self.publish();
    }

    /// Publishes the retained `model/state`: the active model, its self-test and the latest transfer.
    pub(crate) fn publish(&self) {
        let payload = {
            let g = self.lock();
            json!({
                "state": "active",
                "model": super::model_json(&self.engine.load()),
                "self_test": g.report,
                "transfer": g.transfer,
                "background": g.background,
                "at": now_rfc3339(),
            })
        };
        if let Err(e) = self.mqtt.publish_retained(self.mqtt.topics().model_state(), &payload) {
            tracing::warn!(error = %e, "could not queue the model state");
        }
    }
}
