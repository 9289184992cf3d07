//! Our own weights file: safetensors, f32, canonical names, and `__metadata__` saying how to run the weights.
//!
//! ```text
//! {"format": "attrd-effnet-v1", "arch": "efficientnet-lite0", "padding": "symmetric", "bn_eps": "0.001",
//!  "source": "lukemelas", "source_sha256": "5793…"}
//! ```

use super::error::WeightsError;
use super::import::check_tensors;
use super::read::{CheckpointFormat, read_checkpoint_bytes};
use super::{Backbone, Provenance, Tensor};
use crate::effnet::{Arch, Padding};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::{Rng, distributions::Open01};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Value of the `format` metadata key; bump the suffix when the layout changes incompatibly.
pub const FORMAT_TAG: &str = "attrd-effnet-v1";

/// The metadata of a canonical file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CanonicalMeta {
    pub arch: Arch,
    pub padding: Padding,
    pub bn_eps: f32,
    pub provenance: Provenance,
}

impl CanonicalMeta {
    /// Parses our metadata; the error is a human-readable reason.
    pub fn from_metadata(m: &BTreeMap<String, String>) -> Result<Self, String> {
        let get = |k: &str| m.get(k).ok_or_else(|| format!("metadata has no {k:?}"));
        let format = get("format")?;
        if format != FORMAT_TAG {
            return Err(format!("format is {format:?}, expected {FORMAT_TAG:?}"));
        }
        let arch: Arch = get("arch")?.parse()?;
        let padding: Padding = get("padding")?.parse()?;
        let eps_text = get("bn_eps")?;
        let bn_eps: f32 = eps_text.parse().map_err(|_| format!("bn_eps {eps_text:?} is not a number"))?;
        if !(bn_eps.is_finite() && bn_eps > 0.0) {
            return Err(format!("bn_eps {eps_text:?} is not a positive number"));
        }
        let provenance = Provenance {
            source: m.get("source").cloned().unwrap_or_else(|| "unknown".into()),
            source_sha256: m.get("source_sha256").cloned(),
        };
        Ok(Self { arch, padding, bn_eps, provenance })
    }

    fn to_metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::from([
            ("format".to_owned(), FORMAT_TAG.to_owned()),
            ("arch".to_owned(), self.arch.as_str().to_owned()),
            ("padding".to_owned(), self.padding.as_str().to_owned()),
            // Display of f32 is the shortest string that parses back to the same value ("0.001", "0.00001").
            ("bn_eps".to_owned(), self.bn_eps.to_string()),
            ("source".to_owned(), self.provenance.source.clone()),
        ]);
        if let Some(sha) = &self.provenance.source_sha256 {
            m.insert("source_sha256".to_owned(), sha.clone());
        }
        m
    }
}

impl Backbone {
    /// Checks that the tensors are exactly what the architecture needs (plus an optional classifier) and that the
    /// data lengths agree with the shapes.
    pub fn validate(&self) -> Result<(), WeightsError> {
        for (name, t) in &self.tensors {
            if t.shape.iter().product::<usize>() != t.data.len() {
                return Err(WeightsError::Invalid(format!(
                    "tensor {name} has shape {:?} but {} values",
                    t.shape,
                    t.data.len()
                )));
            }
        }
        let shapes = self.tensors.iter().map(|(n, t)| (n.as_str(), t.shape.as_slice(), None));
        check_tensors(self.arch, "backbone", shapes, true, Vec::new())?;
        if !(self.bn_eps.is_finite() && self.bn_eps > 0.0) {
            return Err(WeightsError::Invalid(format!("batch-norm epsilon {} is not a positive number", self.bn_eps)));
        }
        Ok(())
    }

    /// Number of classes of the attached ImageNet-style classifier, if any.
    pub fn classifier_classes(&self) -> Option<usize> {
        self.tensors.get("classifier.weight").and_then(|t| t.shape.first().copied())
    }

    /// Writes the canonical safetensors file (atomically: a sibling temp file renamed into place).
    pub fn save(&self, path: &Path) -> Result<(), WeightsError> {
        self.validate()?;
        let meta = CanonicalMeta {
            arch: self.arch,
            padding: self.padding,
            bn_eps: self.bn_eps,
            provenance: self.provenance.clone(),
        };
        let bytes: Vec<(&str, &[usize], Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.data.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        let views = bytes
            .iter()
            .map(|(n, shape, b)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), b).map(|v| (*n, v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(WeightsError::Safetensors)?;
        let data = safetensors::serialize(views, Some(meta.to_metadata())).map_err(WeightsError::Safetensors)?;

        let file_name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{file_name}.tmp"));
        let write = |p: &Path| -> Result<(), WeightsError> {
            std::fs::write(p, &data).map_err(|source| WeightsError::Write { path: p.to_owned(), source })
        };
        write(&tmp)?;
        std::fs::rename(&tmp, path).map_err(|source| {
            // Best effort: do not leave the temp file behind; the rename error is the one worth reporting.
            let _ = std::fs::remove_file(&tmp);
            WeightsError::Write { path: path.to_owned(), source }
        })?;
        tracing::info!(path = %path.display(), arch = %self.arch, tensors = self.tensors.len(), "saved canonical weights");
        Ok(())
    }

    /// Reads a file written by [`Backbone::save`]. Anything else, including a valid safetensors file without our
    /// format tag, is rejected: those go through [`super::import`], which knows how to map and default them.
    pub fn load(path: &Path) -> Result<Self, WeightsError> {
        let not_canonical = |reason: String| WeightsError::NotCanonical { path: path.to_owned(), reason };
        let bytes = std::fs::read(path).map_err(|source| WeightsError::Read { path: path.to_owned(), source })?;
        let ckpt = read_checkpoint_bytes(&bytes)?;
        if ckpt.format != CheckpointFormat::Safetensors {
            return Err(not_canonical(format!("it is a {} file; import it instead", ckpt.format)));
        }
        if !ckpt.metadata.contains_key("format") {
            return Err(not_canonical(format!(
                "its metadata has no \"format\": {FORMAT_TAG:?} tag (a foreign safetensors file? import it instead)"
            )));
        }
        let meta = CanonicalMeta::from_metadata(&ckpt.metadata).map_err(not_canonical)?;
        let mut tensors = BTreeMap::new();
        for (name, t) in ckpt.tensors {
            let super::raw::TensorData::F32(data) = t.data else {
                return Err(not_canonical(format!("tensor {name} is {}, not float32", t.data.dtype())));
            };
            tensors.insert(name, Tensor::new(t.shape, data));
        }
        let backbone = Backbone {
            arch: meta.arch,
            padding: meta.padding,
            bn_eps: meta.bn_eps,
            tensors,
            provenance: meta.provenance,
        };
        backbone.validate()?;
        tracing::debug!(path = %path.display(), arch = %backbone.arch, "loaded canonical weights");
        Ok(backbone)
    }

    /// A freshly initialized backbone, as torchvision initializes EfficientNet: convolutions (including the SE
    /// 1×1 convs) Kaiming-normal with fan-out and gain √2, conv biases 0, BN weight 1 / bias 0 / mean 0 / var 1.
    /// Deterministic for a given seed (rand 0.8's `StdRng`). PyTorch-native conventions apply: symmetric padding,
    /// BN eps 1e-5. No classifier; heads are separate.
    pub fn random(arch: Arch, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        // backbone_tensors() has a fixed order, so the same seed always gives the same values per tensor.
        for (name, shape) in arch.backbone_tensors() {
            let n: usize = shape.iter().product();
            let data = if name.ends_with(".bn.weight") || name.ends_with(".bn.running_var") {
                vec![1.0; n]
            } else if shape.len() == 4 {
                // torch's fan-out for a conv weight [out, in/groups, kh, kw] is out·kh·kw (groups do not divide it).
                let fan_out = (shape[0] * shape[2] * shape[3]) as f64;
                let std = (2.0 / fan_out).sqrt();
                (0..n).map(|_| (std * standard_normal(&mut rng)) as f32).collect()
            } else {
                vec![0.0; n]
            };
            tensors.insert(name, Tensor::new(shape, data));
        }
        Backbone {
            arch,
            padding: Padding::Symmetric,
            bn_eps: 1e-5,
            tensors,
            provenance: Provenance { source: format!("random:seed={seed}"), source_sha256: None },
        }
    }
}

/// Box–Muller; `Open01` excludes 0 so the logarithm is finite.
fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.sample(Open01);
    let u2: f64 = rng.sample(Open01);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips() {
        let m = CanonicalMeta {
            arch: Arch::Lite0,
            padding: Padding::Symmetric,
            bn_eps: 1e-3,
            provenance: Provenance { source: "lukemelas".into(), source_sha256: Some("ab".into()) },
        };
        let md: BTreeMap<String, String> = m.to_metadata().into_iter().collect();
        assert_eq!(md["bn_eps"], "0.001");
        assert_eq!(md["arch"], "efficientnet-lite0");
        assert_eq!(CanonicalMeta::from_metadata(&md).unwrap(), m);
        let mut bad = md.clone();
        bad.insert("format".into(), "other".into());
        assert!(CanonicalMeta::from_metadata(&bad).unwrap_err().contains("attrd-effnet-v1"));
    }

    #[test]
    fn random_init_has_the_right_statistics() {
        let b = Backbone::random(Arch::B0, 7);
        b.validate().unwrap();
        let w = &b.tensors["blocks.15.project.conv.weight"]; // [320, 1152, 1, 1]: fan_out 320
        let n = w.data.len() as f64;
        let mean = w.data.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = w.data.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 1e-3, "{mean}");
        assert!((var - 2.0 / 320.0).abs() < 2.0 / 320.0 * 0.02, "{var}");
        assert!(b.tensors["stem.bn.running_var"].data.iter().all(|&x| x == 1.0));
        assert!(b.tensors["blocks.0.se.reduce.bias"].data.iter().all(|&x| x == 0.0));
        assert_eq!(Backbone::random(Arch::B0, 7).tensors, b.tensors);
        assert_ne!(Backbone::random(Arch::B0, 8).tensors["stem.conv.weight"], b.tensors["stem.conv.weight"]);
    }
}
