//! Prometheus / OpenMetrics metrics of the daemon.
//!
//! One [`Metrics`] value is created at start-up and cloned into every part of the daemon (the handles share one
//! registry). Label values are bounded: stages and error kinds are enums, `source` is a configured name (a hot
//! folder, a camera, `http`), and the model and provider labels change only when a model is swapped, at which point
//! the old series are removed rather than left behind at 1.
//!
//! Exposed series (all prefixed `attrd_`):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `attrd_stage_seconds` | histogram | `stage` = decode, preprocess, queue, infer, publish, total |
//! | `attrd_images_total` | counter | `source` |
//! | `attrd_errors_total` | counter | `kind` (see [`ErrorKind`]) |
//! | `attrd_outbox_depth` | gauge | messages waiting in the outbox |
//! | `attrd_outbox_bytes` | gauge | payload bytes waiting in the outbox |
//! | `attrd_mqtt_connected` | gauge | 1 while connected to the broker |
//! | `attrd_batch_size` | histogram | images per engine run |
//! | `attrd_model_info` | gauge (info-style, always 1) | `name`, `version`, `sha256`, `provider` |
//! | `attrd_active_provider` | gauge (info-style, always 1) | `provider` |
//! | `attrd_alarm` | gauge, 1 while raised | `alarm` (see [`Alarm`]) |

use crate::engine::Engine;
use crate::preprocess::PreprocessError;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// `Content-Type` of [`Metrics::encode`] (OpenMetrics text 1.0.0).
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of [`Metrics::encode_prometheus`] (Prometheus text 0.0.4).
pub const PROMETHEUS_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A timed step of an image's way through the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Decoding the encoded image (when a caller times it apart from the rest of preprocessing).
    Decode,
    /// Decode + orient + resize + normalize ([`Preprocessor::prepare`](crate::preprocess::Preprocessor::prepare)).
    Preprocess,
    /// Waiting for a batch slot or an engine.
    Queue,
    /// One engine run (the whole batch).
    Infer,
    /// Storing the result durably in the outbox (the broker's acknowledgement comes after, asynchronously).
    Publish,
    /// From receiving the image to its result being stored or returned.
    Total,
}

impl Stage {
    pub const ALL: [Stage; 6] =
        [Stage::Decode, Stage::Preprocess, Stage::Queue, Stage::Infer, Stage::Publish, Stage::Total];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Preprocess => "preprocess",
            Stage::Queue => "queue",
            Stage::Infer => "infer",
            Stage::Publish => "publish",
            Stage::Total => "total",
        }
    }
}

/// A condition that needs an operator, shown as `attrd_alarm{alarm} 1` while it lasts, in the retained MQTT status
/// and in the log (raised at error level once, cleared at info level once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Alarm {
    /// The outbox cannot store results (disk full, read-only or failing state directory). Photos stay with their
    /// sources and are retried; nothing is lost, but nothing new is published either.
    OutboxUnwritable,
    /// The outbox holds its configured maximum (the broker has been away too long).
    OutboxFull,
    /// At start the active model could not serve (it failed verification or its self-test), and a previous one
    /// serves instead. Cleared when another model is activated.
    ModelFallback,
}

impl Alarm {
    pub const ALL: [Alarm; 3] = [Alarm::OutboxUnwritable, Alarm::OutboxFull, Alarm::ModelFallback];

    pub fn as_str(self) -> &'static str {
        match self {
            Alarm::OutboxUnwritable => "outbox_unwritable",
            Alarm::OutboxFull => "outbox_full",
            Alarm::ModelFallback => "model_fallback",
        }
    }
}

/// A raised alarm, for status reports.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RaisedAlarm {
    /// The alarm's name ([`Alarm::as_str`]).
    pub alarm: &'static str,
    /// When it was raised.
    #[serde(with = "time::serde::rfc3339")]
    pub since: time::OffsetDateTime,
    /// The error that raised it.
    pub reason: String,
}

/// What went wrong, as counted by `attrd_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Corrupt, truncated or empty image data.
    Decode,
    /// Not JPEG, PNG or WebP.
    UnsupportedFormat,
    /// Over a size or pixel limit.
    Limit,
    /// Reading an input failed.
    Io,
    /// The engine failed to run a batch.
    Infer,
    /// The outbox refused a result because it is full.
    OutboxFull,
    /// Any other outbox (SQLite) failure.
    Outbox,
    /// Broker connection or publish failure.
    Mqtt,
    /// A camera capture failed.
    Capture,
    /// A model failed to load or to pass its self-test.
    Model,
    /// A bug or an unexpected internal condition.
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::Decode,
        ErrorKind::UnsupportedFormat,
        ErrorKind::Limit,
        ErrorKind::Io,
        ErrorKind::Infer,
        ErrorKind::OutboxFull,
        ErrorKind::Outbox,
        ErrorKind::Mqtt,
        ErrorKind::Capture,
        ErrorKind::Model,
        ErrorKind::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Decode => "decode",
            ErrorKind::UnsupportedFormat => "unsupported_format",
            ErrorKind::Limit => "limit",
            ErrorKind::Io => "io",
            ErrorKind::Infer => "infer",
            ErrorKind::OutboxFull => "outbox_full",
            ErrorKind::Outbox => "outbox",
            ErrorKind::Mqtt => "mqtt",
            ErrorKind::Capture => "capture",
            ErrorKind::Model => "model",
            ErrorKind::Internal => "internal",
        }
    }
}

impl From<&PreprocessError> for ErrorKind {
    fn from(e: &PreprocessError) -> Self {
        match e {
            PreprocessError::Empty | PreprocessError::Decode { .. } | PreprocessError::Truncated { .. } => {
                ErrorKind::Decode
            }
            PreprocessError::FileTooLarge { .. } | PreprocessError::TooManyPixels { .. } => ErrorKind::Limit,
            PreprocessError::UnknownFormat { .. } | PreprocessError::UnsupportedFormat { .. } => {
                ErrorKind::UnsupportedFormat
            }
            PreprocessError::Io { .. } => ErrorKind::Io,
            _ => ErrorKind::Internal,
        }
    }
}

macro_rules! label_value_via_as_str {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}
label_value_via_as_str!(Stage, ErrorKind, Alarm);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StageLabels {
    stage: Stage,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    kind: ErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AlarmLabels {
    alarm: Alarm,
}

/// Labels of `attrd_model_info`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ModelLabels {
    /// Model name from the manifest.
    pub name: String,
    /// Model version from the manifest.
    pub version: String,
    /// SHA-256 of the ONNX file.
    pub sha256: String,
    /// Execution provider serving the model.
    pub provider: String,
}

impl ModelLabels {
    pub fn of(engine: &Engine) -> Self {
        let m = engine.manifest();
        ModelLabels {
            name: m.name.clone(),
            version: m.version.to_string(),
            sha256: engine.model_sha256().to_string(),
            provider: engine.providers().active.as_str().to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn stage_histogram() -> Histogram {
    // 0.5 ms … ~16 s: a resize of a small PNG up to a 50 MP studio JPEG on a busy CPU fallback.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 9))
}

/// The daemon's metrics. Cheap to clone; every clone updates and exposes the same series.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Mutex<Registry>,
    stage: HistogramFamily<StageLabels>,
    images: Family<SourceLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    outbox_depth: Gauge,
    outbox_bytes: Gauge,
    mqtt_connected: Gauge,
    batch_size: Histogram,
    results_dropped: Counter,
    model_info: Family<ModelLabels, Gauge>,
    active_provider: Family<ProviderLabels, Gauge>,
    alarm: Family<AlarmLabels, Gauge>,
    raised: Mutex<std::collections::BTreeMap<Alarm, RaisedAlarm>>,
    /// Serialises model swaps so two concurrent swaps cannot both leave their labels at 1.
    swap: Mutex<()>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("attrd");
        let stage: HistogramFamily<StageLabels> = Family::new_with_constructor(stage_histogram);
        let images = Family::<SourceLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let outbox_depth = Gauge::default();
        let outbox_bytes = Gauge::default();
        let mqtt_connected = Gauge::default();
        let batch_size = batch_histogram();
        let results_dropped = Counter::default();
        let model_info = Family::<ModelLabels, Gauge>::default();
        let active_provider = Family::<ProviderLabels, Gauge>::default();
        let alarm = Family::<AlarmLabels, Gauge>::default();
        registry.register("stage_seconds", "Time spent per processing stage, in seconds", stage.clone());
        registry.register("images", "Images received, by source", images.clone());
        registry.register("errors", "Errors, by kind", errors.clone());
        registry.register("outbox_depth", "Messages waiting in the outbox", outbox_depth.clone());
        registry.register("outbox_bytes", "Payload bytes waiting in the outbox", outbox_bytes.clone());
        registry.register("mqtt_connected", "1 while connected to the MQTT broker, else 0", mqtt_connected.clone());
        registry.register("batch_size", "Images per engine run", batch_size.clone());
        registry.register(
            "results_dropped",
            "Unpublished results deleted from the full outbox to make room (outbox.when_full = drop_oldest)",
            results_dropped.clone(),
        );
        registry.register("model_info", "The serving model (always 1; labels identify it)", model_info.clone());
        registry.register(
            "active_provider",
            "The execution provider serving the model (always 1; the label names it)",
            active_provider.clone(),
        );
        registry.register("alarm", "1 while the alarm is raised (see the log and the MQTT status)", alarm.clone());
        // Known series exist from the start, at zero, so dashboards and `rate()` see them before the first event.
        for s in Stage::ALL {
            drop(stage.get_or_create(&StageLabels { stage: s }));
        }
        for k in ErrorKind::ALL {
            drop(errors.get_or_create(&ErrorLabels { kind: k }));
        }
        for a in Alarm::ALL {
            drop(alarm.get_or_create(&AlarmLabels { alarm: a }));
        }
        Metrics {
            inner: Arc::new(Inner {
                registry: Mutex::new(registry),
                stage,
                images,
                errors,
                outbox_depth,
                outbox_bytes,
                mqtt_connected,
                batch_size,
                results_dropped,
                model_info,
                active_provider,
                alarm,
                raised: Mutex::new(std::collections::BTreeMap::new()),
                swap: Mutex::new(()),
            }),
        }
    }

    /// Counts results the full outbox deleted unpublished (policy `drop_oldest`).
    pub fn results_dropped(&self, n: u64) {
        self.inner.results_dropped.inc_by(n);
    }

    /// Records how long `stage` took.
    pub fn observe_stage(&self, stage: Stage, took: Duration) {
        self.inner.stage.get_or_create(&StageLabels { stage }).observe(took.as_secs_f64());
    }

    /// Counts one image received from `source` (a hot folder or camera name, or `http`).
    pub fn image(&self, source: &str) {
        self.inner.images.get_or_create(&SourceLabels { source: source.to_string() }).inc();
    }

    /// Counts one error.
    /// Counts `n` errors of `kind` at once.
    pub fn errors(&self, kind: ErrorKind, n: u64) {
        self.inner.errors.get_or_create(&ErrorLabels { kind }).inc_by(n);
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors(kind, 1);
    }

    /// Sets the outbox gauges.
    pub fn set_outbox(&self, depth: u64, bytes: u64) {
        self.inner.outbox_depth.set(clamp_i64(depth));
        self.inner.outbox_bytes.set(clamp_i64(bytes));
    }

    pub fn set_mqtt_connected(&self, connected: bool) {
        self.inner.mqtt_connected.set(i64::from(connected));
    }

    /// Raises `alarm` because of `reason`; true when it was not raised before (so the caller logs it once).
    pub fn raise(&self, alarm: Alarm, reason: &str) -> bool {
        let mut raised = self.inner.raised.lock().unwrap_or_else(PoisonError::into_inner);
        self.inner.alarm.get_or_create(&AlarmLabels { alarm }).set(1);
        match raised.get_mut(&alarm) {
            Some(r) => {
                reason.clone_into(&mut r.reason);
                false
            }
            None => {
                let since = time::OffsetDateTime::now_utc();
                raised.insert(alarm, RaisedAlarm { alarm: alarm.as_str(), since, reason: reason.to_owned() });
                true
            }
        }
    }

    /// Clears `alarm`; returns it if it was raised (so the caller logs the all-clear once).
    pub fn clear(&self, alarm: Alarm) -> Option<RaisedAlarm> {
        // Called for every stored result: when nothing is raised this is one map lookup; the gauge is only ever 1
        // while the alarm is in the map.
        let was = self.inner.raised.lock().unwrap_or_else(PoisonError::into_inner).remove(&alarm)?;
        self.inner.alarm.get_or_create(&AlarmLabels { alarm }).set(0);
        Some(was)
    }

    /// The alarms raised now.
    pub fn alarms(&self) -> Vec<RaisedAlarm> {
        self.inner.raised.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    /// Records the size of one engine run.
    pub fn observe_batch(&self, images: usize) {
        self.inner.batch_size.observe(images as f64);
    }

    /// Marks `engine`'s model and provider as the serving ones, removing the previous model's series.
    pub fn set_model(&self, engine: &Engine) {
        self.set_model_labels(ModelLabels::of(engine));
    }

    /// [`set_model`](Self::set_model) from explicit labels.
    pub fn set_model_labels(&self, labels: ModelLabels) {
        let _swap = self.inner.swap.lock().unwrap_or_else(PoisonError::into_inner);
        self.inner.model_info.clear();
        self.inner.active_provider.clear();
        self.inner.active_provider.get_or_create(&ProviderLabels { provider: labels.provider.clone() }).set(1);
        self.inner.model_info.get_or_create(&labels).set(1);
    }

    /// Removes the model and provider series (no model is serving).
    pub fn clear_model(&self) {
        let _swap = self.inner.swap.lock().unwrap_or_else(PoisonError::into_inner);
        self.inner.model_info.clear();
        self.inner.active_provider.clear();
    }

    /// Lets another part of the daemon register its own metrics; names get the `attrd_` prefix.
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        // A panic while registering cannot leave the registry half-updated in a way that matters for encoding.
        f(&mut self.inner.registry.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// All metrics in the OpenMetrics text format ([`OPENMETRICS_CONTENT_TYPE`]), ending with `# EOF`.
    pub fn encode(&self) -> String {
        let registry = self.inner.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail, and our label values never fail to encode.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// All metrics in the Prometheus text format 0.0.4 ([`PROMETHEUS_CONTENT_TYPE`]), for scrapers that do not
    /// negotiate OpenMetrics.
    pub fn encode_prometheus(&self) -> String {
        let registry = self.inner.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::with_capacity(8 * 1024);
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn every_series_is_exposed_with_its_labels() {
        let m = Metrics::new();
        m.observe_stage(Stage::Infer, Duration::from_millis(3));
        m.image("http");
        m.image("http");
        m.error(ErrorKind::OutboxFull);
        m.set_outbox(7, 1234);
        m.set_mqtt_connected(true);
        m.observe_batch(5);
        m.results_dropped(3);
        let text = m.encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE attrd_stage_seconds histogram"), "{text}");
        assert_eq!(
            line(&text, r#"attrd_stage_seconds_count{stage="infer"}"#),
            Some(r#"attrd_stage_seconds_count{stage="infer"} 1"#)
        );
        assert_eq!(
            line(&text, r#"attrd_stage_seconds_count{stage="total"}"#),
            Some(r#"attrd_stage_seconds_count{stage="total"} 0"#)
        );
        assert_eq!(line(&text, r#"attrd_images_total{source="http"}"#), Some(r#"attrd_images_total{source="http"} 2"#));
        assert_eq!(
            line(&text, r#"attrd_errors_total{kind="outbox_full"}"#),
            Some(r#"attrd_errors_total{kind="outbox_full"} 1"#)
        );
        assert_eq!(line(&text, r#"attrd_errors_total{kind="mqtt"}"#), Some(r#"attrd_errors_total{kind="mqtt"} 0"#));
        assert_eq!(line(&text, "attrd_outbox_depth "), Some("attrd_outbox_depth 7"));
        assert_eq!(line(&text, "attrd_results_dropped_total "), Some("attrd_results_dropped_total 3"));
        assert_eq!(line(&text, "attrd_outbox_bytes "), Some("attrd_outbox_bytes 1234"));
        assert_eq!(line(&text, "attrd_mqtt_connected "), Some("attrd_mqtt_connected 1"));
        assert_eq!(line(&text, r#"attrd_batch_size_bucket{le="4.0"}"#), Some(r#"attrd_batch_size_bucket{le="4.0"} 0"#));
        assert_eq!(line(&text, r#"attrd_batch_size_bucket{le="8.0"}"#), Some(r#"attrd_batch_size_bucket{le="8.0"} 1"#));
        let prom = m.encode_prometheus();
        assert!(!prom.contains("# EOF"));
        assert!(prom.contains(r#"attrd_images_total{source="http"} 2"#), "{prom}");
    }

    #[test]
    fn model_swap_removes_the_old_labels() {
        let m = Metrics::new();
        let v1 =
            ModelLabels { name: "m".into(), version: "1.0.0".into(), sha256: "aa".into(), provider: "cuda".into() };
        m.set_model_labels(v1);
        let v2 = ModelLabels { name: "m".into(), version: "1.1.0".into(), sha256: "bb".into(), provider: "cpu".into() };
        m.set_model_labels(v2);
        let text = m.encode();
        let info: Vec<&str> = text.lines().filter(|l| l.starts_with("attrd_model_info{")).collect();
        assert_eq!(info, [r#"attrd_model_info{name="m",version="1.1.0",sha256="bb",provider="cpu"} 1"#], "{text}");
        let prov: Vec<&str> = text.lines().filter(|l| l.starts_with("attrd_active_provider{")).collect();
        assert_eq!(prov, [r#"attrd_active_provider{provider="cpu"} 1"#]);
        m.clear_model();
        assert!(!m.encode().contains("attrd_model_info{"));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.image("cam \"front\"\nline");
        let text = m.encode();
        assert!(text.contains(r#"attrd_images_total{source="cam \"front\"\nline"} 1"#), "{text}");
    }

    #[test]
    fn preprocess_errors_map_to_kinds() {
        assert_eq!(ErrorKind::from(&PreprocessError::Empty), ErrorKind::Decode);
        assert_eq!(ErrorKind::from(&PreprocessError::FileTooLarge { bytes: 2, limit: 1 }), ErrorKind::Limit);
        assert_eq!(
            ErrorKind::from(&PreprocessError::UnknownFormat { magic: "00".into() }),
            ErrorKind::UnsupportedFormat
        );
    }

    #[test]
    fn other_modules_can_register() {
        let m = Metrics::new();
        let c = Counter::<u64>::default();
        m.with_registry(|r| r.register("reloads", "Config reloads", c.clone()));
        c.inc();
        assert!(m.encode().contains("attrd_reloads_total 1"));
    }
}
