//! The bundle manifest (`manifest.json`): what a model expects as input, what its outputs mean, and the hashes that
//! tie the manifest to the files beside it. `models/bundle-manifest.schema.json` documents the same structure for
//! people and non-Rust tools; a test keeps the two in agreement.

use super::BundleError;
use crate::preprocess::InputSpec;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use time::OffsetDateTime;

/// The manifest schema this build reads and writes. A bundle with another version is refused rather than guessed at.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Model name: lowercase letters, digits, `.`, `_`, `-`; 1–64 characters. Bundles of one name are versions of one
    /// model and replace each other on activation.
    pub name: String,
    /// Semantic version of this model.
    pub version: semver::Version,
    /// When the bundle was packaged (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Free text for operators.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Backbone, e.g. `efficientnet-b0` or `efficientnet-lite0`.
    pub architecture: String,
    /// Numeric precision of the ONNX graph's weights.
    pub precision: Precision,
    /// Which data the model was trained on.
    pub training_data: TrainingData,
    /// How images are turned into the input tensor (shared preprocessing).
    pub input: InputSpec,
    /// Name of the ONNX graph's single image input.
    pub input_name: String,
    /// One entry per attribute head, each matching an ONNX output of the same name.
    pub heads: Vec<Head>,
    /// The ONNX graph.
    pub onnx: FileRef,
    /// Optional golden set used to self-test the model on the target execution provider before activation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golden: Option<GoldenRef>,
    /// Free-form evaluation summary written by `trainer package` (metrics per head); informational only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    Fp16,
    Int8,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingData {
    /// Fingerprint of the curated dataset manifest (`sha256:<hex>`), or `none` for weights not trained by us.
    pub fingerprint: String,
    /// Where the data came from, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// How a head's classes relate: exactly one (softmax) or any number (sigmoid per class).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    Single,
    Multi,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    /// Attribute name; also the ONNX output name.
    pub name: String,
    /// Single-label (softmax) or multi-label (sigmoid).
    pub kind: HeadKind,
    /// Class names in output order.
    pub classes: Vec<String>,
    /// Only meaningful for items whose value of another (single-label) head is one of these; for other items the
    /// attribute is reported as not applicable instead of guessed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applies_to: Option<AppliesTo>,
    /// Logits are divided by this before softmax/sigmoid (temperature scaling fitted on validation data).
    #[serde(default = "one")]
    pub temperature: f32,
    /// Per-class probability a prediction needs to be accepted (otherwise the head abstains); same order as `classes`.
    pub thresholds: Vec<f32>,
    /// How many alternatives results carry.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

fn one() -> f32 {
    1.0
}

fn default_top_k() -> usize {
    5
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppliesTo {
    /// Name of the single-label head this attribute depends on (e.g. `articleType`).
    pub attribute: String,
    /// Values of that head for which this attribute applies.
    pub values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    /// File name inside the bundle directory (no directories).
    pub file: String,
    /// Lowercase hex SHA-256 of the file's bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenRef {
    /// The golden-set index file inside the bundle directory.
    pub file: String,
    /// Lowercase hex SHA-256 of that file (which in turn pins each image by hash).
    pub sha256: String,
}

/// The golden set: images with the probabilities the reference (fp32) model produced for them. Any build of the
/// model on any execution provider must reproduce them within `tolerance` before it may serve.
///
/// A quantized model also carries what the shipped graph itself computed on ONNX Runtime's CPU provider where it was
/// packaged (`cpu_probabilities`). Its integer kernels are exact wherever they cannot saturate, so another CPU must
/// land much closer to those than to the fp32 references: `cpu_tolerance` catches a CPU that computes something
/// else (saturating kernels, a miscompiled kernel) long before the fp32 tolerance, which must allow for quantization
/// itself, would.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenSet {
    /// Largest allowed absolute difference of any probability from the fp32 references.
    pub tolerance: f32,
    /// Largest allowed absolute difference from `cpu_probabilities` on the CPU provider; present exactly when every
    /// item has `cpu_probabilities`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_tolerance: Option<f32>,
    pub items: Vec<GoldenItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenItem {
    /// Image path relative to the bundle directory, under `golden/`.
    pub file: String,
    /// Lowercase hex SHA-256 of the image.
    pub sha256: String,
    /// Head name → expected probabilities (after temperature), in class order.
    pub probabilities: BTreeMap<String, Vec<f32>>,
    /// Head name → the shipped (quantized) graph's own probabilities on ONNX Runtime's CPU provider, as packaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_probabilities: Option<BTreeMap<String, Vec<f32>>>,
}

impl Manifest {
    /// Checks everything that can be checked without the files: names, versions, class lists, thresholds and the
    /// cross-references between heads.
    pub fn validate(&self) -> Result<(), BundleError> {
        let bad = |msg: String| Err(BundleError::InvalidManifest(msg));
        if self.schema_version != SCHEMA_VERSION {
            return Err(BundleError::UnsupportedSchema { found: self.schema_version, supported: SCHEMA_VERSION });
        }
        if !valid_name(&self.name) {
            return bad(format!(
                "name {:?} must be 1-64 characters of lowercase letters, digits, '.', '_' or '-', starting with a letter or digit",
                self.name
            ));
        }
        if self.architecture.trim().is_empty() {
            return bad("architecture is empty".into());
        }
        if self.training_data.fingerprint.trim().is_empty() {
            return bad("training_data.fingerprint is empty (use \"none\" for weights not trained by attrd)".into());
        }
        self.input.validate().map_err(|e| BundleError::InvalidManifest(format!("input: {e}")))?;
        if self.input_name.is_empty() {
            return bad("input_name is empty".into());
        }
        check_file_name("onnx.file", &self.onnx.file)?;
        check_sha256("onnx.sha256", &self.onnx.sha256)?;
        if let Some(g) = &self.golden {
            check_file_name("golden.file", &g.file)?;
            check_sha256("golden.sha256", &g.sha256)?;
        }
        if self.heads.is_empty() {
            return bad("heads is empty: a model must predict at least one attribute".into());
        }
        let mut names = HashSet::new();
        for h in &self.heads {
            if h.name.is_empty() || h.name == self.input_name {
                return bad(format!("head name {:?} is empty or collides with the input name", h.name));
            }
            if !names.insert(h.name.as_str()) {
                return bad(format!("head {:?} appears twice", h.name));
            }
            h.validate()?;
        }
        for h in &self.heads {
            if let Some(a) = &h.applies_to {
                let Some(parent) = self.heads.iter().find(|p| p.name == a.attribute) else {
                    return bad(format!("head {:?}: applies_to names unknown head {:?}", h.name, a.attribute));
                };
                if parent.name == h.name || parent.kind != HeadKind::Single || parent.applies_to.is_some() {
                    return bad(format!(
                        "head {:?}: applies_to must name another single-label head that is itself unconditional",
                        h.name
                    ));
                }
                if a.values.is_empty() {
                    return bad(format!("head {:?}: applies_to.values is empty", h.name));
                }
                for v in &a.values {
                    if !parent.classes.contains(v) {
                        return bad(format!(
                            "head {:?}: applies_to value {v:?} is not a class of {:?}",
                            h.name, parent.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The head with this name.
    pub fn head(&self, name: &str) -> Option<&Head> {
        self.heads.iter().find(|h| h.name == name)
    }
}

impl Head {
    fn validate(&self) -> Result<(), BundleError> {
        let bad = |msg: String| Err(BundleError::InvalidManifest(format!("head {:?}: {msg}", self.name)));
        if self.classes.is_empty() {
            return bad("has no classes".into());
        }
        if self.kind == HeadKind::Single && self.classes.len() < 2 {
            return bad("a single-label head needs at least two classes".into());
        }
        let mut seen = HashSet::new();
        for c in &self.classes {
            if c.is_empty() {
                return bad("has an empty class name".into());
            }
            if !seen.insert(c.as_str()) {
                return bad(format!("class {c:?} appears twice"));
            }
        }
        if self.thresholds.len() != self.classes.len() {
            return bad(format!("has {} thresholds for {} classes", self.thresholds.len(), self.classes.len()));
        }
        if let Some((i, t)) = self.thresholds.iter().enumerate().find(|(_, t)| !(0.0..=1.0).contains(*t)) {
            return bad(format!("threshold {t} for class {:?} is outside [0, 1]", self.classes[i]));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!("temperature {} must be a positive finite number", self.temperature));
        }
        if self.top_k == 0 {
            return bad("top_k must be at least 1".into());
        }
        Ok(())
    }
}

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'))
}

/// A bundle's files sit directly in its directory (the golden images under `golden/`), so a reference may never climb
/// out of it.
fn check_file_name(field: &str, name: &str) -> Result<(), BundleError> {
    let ok =
        !name.is_empty() && !name.contains(['/', '\\', '\0']) && name != "." && name != ".." && !name.starts_with('.');
    if ok { Ok(()) } else { Err(BundleError::InvalidManifest(format!("{field} {name:?} must be a plain file name"))) }
}

pub(super) fn check_sha256(field: &str, hex: &str) -> Result<(), BundleError> {
    if hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        Ok(())
    } else {
        Err(BundleError::InvalidManifest(format!("{field} must be 64 lowercase hex digits, got {hex:?}")))
    }
}

/// Golden image paths are `golden/<plain name>`.
pub(super) fn check_golden_path(path: &str) -> Result<(), BundleError> {
    match path.strip_prefix("golden/") {
        Some(rest) => check_file_name("golden item", rest),
        None => Err(BundleError::InvalidManifest(format!("golden item {path:?} must be under golden/"))),
    }
}
