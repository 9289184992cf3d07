//! The result message attrd publishes for each item: one JSON object per SKU-level result.
//!
//! Its shape is documented by `docs/schemas/result.schema.json` (JSON Schema 2020-12); the integration tests check
//! real payloads against it, so the schema and this module cannot drift apart silently. Consumers should key on
//! `schema_version`: fields may be added within a version, never removed or retyped.

use crate::engine::{Attributes, Engine};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use time::OffsetDateTime;

/// The payload format this build writes.
pub const SCHEMA_VERSION: u32 = 1;

/// One published result: the attributes of one SKU, from one shot or fused from several views.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultPayload {
    /// Always [`SCHEMA_VERSION`] for payloads written by this build.
    pub schema_version: u32,
    /// Unique id of the message, assigned by the outbox when the result is stored; empty before.
    pub message_id: String,
    /// Per-node sequence number, assigned by the outbox when the result is stored; 0 before.
    pub seq: u64,
    /// The edge node that produced the result.
    pub node: String,
    /// Stock-keeping unit the photo(s) belong to.
    pub sku: String,
    /// When the (first) photo was taken or written.
    #[serde(with = "time::serde::rfc3339")]
    pub captured_at: OffsetDateTime,
    /// When the message was handed to the broker; set by the publisher at send time.
    #[serde(with = "time::serde::rfc3339::option")]
    pub published_at: Option<OffsetDateTime>,
    /// Where the photo came from (the first view's source for fused results).
    pub source: SourceInfo,
    /// The model that produced the attributes.
    pub model: ModelInfo,
    /// Where the time went, per stage.
    pub latency_ms: Latency,
    /// The SKU's attributes (fused over `views` when there are several).
    pub attributes: Attributes,
    /// Per-view results when several shots of one SKU were fused; empty for a single shot.
    pub views: Vec<ViewResult>,
}

impl ResultPayload {
    /// The JSON value the outbox stores and the publisher sends.
    pub fn to_value(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::to_value(self)
    }
}

/// Which kind of source delivered a photo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Hotfolder,
    V4l2,
    Http,
    Fake,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Hotfolder => "hotfolder",
            SourceKind::V4l2 => "v4l2",
            SourceKind::Http => "http",
            SourceKind::Fake => "fake",
        }
    }
}

/// Where one photo came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    #[serde(rename = "type")]
    pub kind: SourceKind,
    /// Camera id for camera sources.
    pub camera: Option<String>,
    /// File path for hot-folder sources (where the file was when it was read).
    pub path: Option<String>,
    /// SHA-256 of the encoded image bytes, lowercase hex.
    pub image_sha256: String,
}

/// Identity of the model that produced a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub name: String,
    /// Semantic version from the bundle manifest.
    pub version: String,
    /// SHA-256 of the ONNX file.
    pub sha256: String,
    /// `fp32`, `fp16`, `int8`, … as in the manifest.
    pub precision: String,
    /// The ONNX Runtime execution provider that actually served (`cuda`, `tensorrt`, `cpu`).
    pub execution_provider: String,
}

impl ModelInfo {
    pub fn of(engine: &Engine) -> Self {
        let m = engine.manifest();
        ModelInfo {
            name: m.name.clone(),
            version: m.version.to_string(),
            sha256: engine.model_sha256().to_string(),
            precision: m.precision.as_str().to_string(),
            execution_provider: engine.providers().active.as_str().to_string(),
        }
    }
}

/// Milliseconds spent per pipeline stage (fractional).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    /// Hashing, decoding, resizing and normalizing the image on a worker thread.
    pub decode_preprocess: f64,
    /// Waiting: for a decode worker, for the batch to fill, for the engine.
    pub queue: f64,
    /// The batch's inference call (shared by every image in the batch).
    pub infer: f64,
    /// From the pipeline receiving the shot to the result being ready for the outbox (for fused results: from the
    /// first view, so it includes the fusion window).
    pub total: f64,
}

/// Milliseconds in a duration, for [`Latency`].
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One view of a fused SKU result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewResult {
    #[serde(with = "time::serde::rfc3339")]
    pub captured_at: OffsetDateTime,
    pub source: SourceInfo,
    pub latency_ms: Latency,
    /// This view's own attributes, before fusion.
    pub attributes: Attributes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_through_json() {
        let p = ResultPayload {
            schema_version: SCHEMA_VERSION,
            message_id: String::new(),
            seq: 0,
            node: "n1".into(),
            sku: "S".into(),
            captured_at: time::macros::datetime!(2025-01-02 03:04:05.5 UTC),
            published_at: None,
            source: SourceInfo {
                kind: SourceKind::Hotfolder,
                camera: None,
                path: Some("/in/S.jpg".into()),
                image_sha256: "00".repeat(32),
            },
            model: ModelInfo {
                name: "m".into(),
                version: "1.0.0".into(),
                sha256: "11".repeat(32),
                precision: "fp32".into(),
                execution_provider: "cpu".into(),
            },
            latency_ms: Latency { decode_preprocess: 1.0, queue: 2.0, infer: 3.0, total: 6.5 },
            attributes: Attributes::new(),
            views: vec![],
        };
        let v = p.to_value().unwrap();
        assert_eq!(v["captured_at"], "2025-01-02T03:04:05.5Z");
        assert_eq!(v["published_at"], serde_json::Value::Null);
        assert_eq!(v["source"]["type"], "hotfolder");
        let back: ResultPayload = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);
    }
}
