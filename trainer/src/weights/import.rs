//! Import of foreign checkpoints into a canonical [`Backbone`].

use super::canonical::CanonicalMeta;
use super::error::{Mismatch, Misshaped, WeightsError};
use super::names::{NameMapper, Source};
use super::raw::{DType, RawTensor};
use super::read::{Checkpoint, CheckpointFormat, read_checkpoint};
use super::{Backbone, Provenance, Tensor};
use crate::effnet::{Arch, FEATURE_DIM, Padding};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The padding and batch-norm epsilon a checkpoint was trained with, when the file itself cannot say.
///
/// | source      | arch  | padding     | BN eps | why |
/// |-------------|-------|-------------|--------|-----|
/// | lukemelas   | B0    | `tf_same`   | 1e-3   | weights converted from the TF reference; lukemelas uses TF "SAME" padding for them |
/// | lukemelas   | Lite0 | `symmetric` | 1e-3   | measured on the shipped Lite0 file: 68/140 top-1 on product photos with symmetric padding vs 59/140 with TF-same |
/// | torchvision | any   | `symmetric` | 1e-5   | PyTorch-native training, `nn.BatchNorm2d` default eps |
/// | timm        | any   | `symmetric` | 1e-5   | timm's native models; its `tf_*` ports need `tf_same` + 1e-3, but a state dict does not carry the model name, so pass those explicitly |
/// | canonical   | any   | from the file's attrd metadata; a canonical-named file without it must be given both explicitly |
pub fn default_convention(source: Source, arch: Arch) -> Option<(Padding, f32)> {
    match (source, arch) {
        (Source::Lukemelas, Arch::B0) => Some((Padding::TfSame, 1e-3)),
        (Source::Lukemelas, Arch::Lite0) => Some((Padding::Symmetric, 1e-3)),
        (Source::Torchvision | Source::Timm, _) => Some((Padding::Symmetric, 1e-5)),
        (Source::Canonical, _) => None,
    }
}

/// Overrides for [`import`]; `Default` detects everything. Padding and BN epsilon left `None` come from the file's
/// attrd metadata or else from [`default_convention`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Force the architecture instead of detecting it (B0 has squeeze-excite tensors, Lite0 has none).
    pub arch: Option<Arch>,
    pub padding: Option<Padding>,
    pub bn_eps: Option<f32>,
    /// Keep the file's single linear classifier as `classifier.{weight,bias}`; otherwise it is dropped.
    pub keep_classifier: bool,
}

/// What [`import`] found and decided.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub format: CheckpointFormat,
    /// Container keys the state dict was nested under (e.g. `["state_dict"]`).
    pub container: Vec<String>,
    pub source: Source,
    /// Architecture the key set indicates.
    pub detected_arch: Arch,
    /// Architecture used (the override, if any).
    pub arch: Arch,
    pub padding: Padding,
    pub bn_eps: f32,
    /// True when padding and eps came from [`default_convention`] rather than options or file metadata.
    pub convention_defaulted: bool,
    /// Hex SHA-256 of the imported file.
    pub source_sha256: String,
    /// Backbone tensors imported (excluding the classifier).
    pub backbone_tensors: usize,
    /// Number of classes of the file's classifier, whether it was kept or dropped.
    pub classifier_classes: Option<usize>,
    pub classifier_kept: bool,
    /// Names (as in the file) that were deliberately dropped: `num_batches_tracked` buffers, and the classifier
    /// unless kept.
    pub dropped: Vec<String>,
    /// Tensors converted to f32 from another dtype, by original dtype.
    pub converted: BTreeMap<DType, usize>,
}

/// Imports a checkpoint (safetensors, torch zip or legacy torch; lukemelas, torchvision, timm or canonical names)
/// into a validated canonical backbone.
pub fn import(path: &Path, opts: &ImportOptions) -> Result<(Backbone, ImportReport), WeightsError> {
    let ckpt = read_checkpoint(path)?;
    let (backbone, report) = import_checkpoint(ckpt, opts)?;
    tracing::info!(
        path = %path.display(),
        format = %report.format,
        source = %report.source,
        arch = %report.arch,
        padding = report.padding.as_str(),
        bn_eps = report.bn_eps,
        tensors = report.backbone_tensors,
        classifier_kept = report.classifier_kept,
        sha256 = %report.source_sha256,
        "imported weights"
    );
    Ok((backbone, report))
}

/// [`import`] on an already-read checkpoint.
pub fn import_checkpoint(ckpt: Checkpoint, opts: &ImportOptions) -> Result<(Backbone, ImportReport), WeightsError> {
    let names = || ckpt.tensors.keys().map(String::as_str);
    let source = Source::detect(names())
        .ok_or_else(|| WeightsError::UnknownSource { sample: names().take(8).collect::<Vec<_>>().join(", ") })?;
    // A canonical file that we wrote says how it was trained; that beats any default.
    let meta = match source {
        Source::Canonical if ckpt.metadata.contains_key("format") => {
            Some(CanonicalMeta::from_metadata(&ckpt.metadata).map_err(WeightsError::Invalid)?)
        }
        _ => None,
    };
    let detected_arch = source.detect_arch(names());
    let arch = opts.arch.or(meta.as_ref().map(|m| m.arch)).unwrap_or(detected_arch);
    if arch != detected_arch {
        tracing::warn!(%detected_arch, %arch, "architecture override disagrees with the checkpoint's tensors");
    }

    let mapper = NameMapper::new(source, arch);
    let mut mapped: BTreeMap<String, (String, RawTensor)> = BTreeMap::new();
    let mut unexpected = Vec::new();
    let mut dropped = Vec::new();
    let mut classifier_classes = None;
    for (name, t) in ckpt.tensors {
        if name == "num_batches_tracked" || name.ends_with(".num_batches_tracked") {
            dropped.push(name);
            continue;
        }
        let canonical = mapper.map(&name);
        if source.is_classifier(&name) {
            if canonical.as_deref() == Some("classifier.weight") && t.shape.len() == 2 {
                classifier_classes = Some(t.shape[0]);
            }
            if !opts.keep_classifier {
                dropped.push(name);
                continue;
            }
        }
        match canonical {
            Some(c) if mapped.contains_key(&c) => unexpected.push(format!("{name} (a second source of {c})")),
            Some(c) => {
                mapped.insert(c, (name, t));
            }
            None => unexpected.push(name),
        }
    }

    let shapes = mapped.iter().map(|(c, (orig, t))| (c.as_str(), t.shape.as_slice(), Some(orig.as_str())));
    check_tensors(arch, source.as_str(), shapes, opts.keep_classifier, unexpected)?;

    let mut converted = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for (canonical, (orig, t)) in mapped {
        let dtype = t.dtype();
        let data = t.to_f32().ok_or_else(|| WeightsError::UnsupportedDtype { name: orig, dtype: dtype.to_string() })?;
        if dtype != DType::F32 {
            *converted.entry(dtype).or_insert(0) += 1;
        }
        tensors.insert(canonical, Tensor::new(t.shape, data));
    }

    let (meta_padding, meta_eps) = match &meta {
        Some(m) => (Some(m.padding), Some(m.bn_eps)),
        None => default_convention(source, arch).map_or((None, None), |(p, e)| (Some(p), Some(e))),
    };
    let padding = opts.padding.or(meta_padding).ok_or(WeightsError::MissingConvention { what: "padding" })?;
    let bn_eps = opts.bn_eps.or(meta_eps).ok_or(WeightsError::MissingConvention { what: "batch-norm epsilon" })?;
    if !(bn_eps.is_finite() && bn_eps > 0.0) {
        return Err(WeightsError::Invalid(format!("batch-norm epsilon {bn_eps} is not a positive number")));
    }
    let convention_defaulted = meta.is_none() && (opts.padding.is_none() || opts.bn_eps.is_none());

    let provenance = match meta {
        // Re-importing our own file keeps the original provenance rather than pointing at the copy.
        Some(m) => m.provenance,
        None => Provenance { source: source.as_str().to_owned(), source_sha256: Some(ckpt.sha256.clone()) },
    };
    let classifier_kept = tensors.contains_key("classifier.weight");
    let report = ImportReport {
        format: ckpt.format,
        container: ckpt.container,
        source,
        detected_arch,
        arch,
        padding,
        bn_eps,
        convention_defaulted,
        source_sha256: ckpt.sha256,
        backbone_tensors: tensors.len() - if classifier_kept { 2 } else { 0 },
        classifier_classes,
        classifier_kept,
        dropped,
        converted,
    };
    Ok((Backbone { arch, padding, bn_eps, tensors, provenance }, report))
}

/// Checks a canonical key set against the architecture: exactly [`Arch::backbone_tensors`] with the listed shapes,
/// plus (when allowed) a complete `classifier.{weight,bias}` pair of shapes `[C, 1280]`, `[C]`. Returns the number
/// of classifier classes. `extra_unexpected` are names the caller already could not place.
pub(crate) fn check_tensors<'a>(
    arch: Arch,
    source: &str,
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize], Option<&'a str>)>,
    allow_classifier: bool,
    extra_unexpected: Vec<String>,
) -> Result<Option<usize>, WeightsError> {
    let expected = arch.backbone_tensors();
    let by_name: BTreeMap<&str, &[usize]> = expected.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    let mut seen = BTreeSet::new();
    let mut unexpected = extra_unexpected;
    let mut misshaped = Vec::new();
    let (mut cls_w, mut cls_b) = (None, None);
    for (name, shape, orig) in tensors {
        let label = || match orig {
            Some(o) if o != name => format!("{name} (from {o})"),
            _ => name.to_owned(),
        };
        if let Some(&want) = by_name.get(name) {
            seen.insert(name);
            if want != shape {
                misshaped.push(Misshaped { name: label(), expected: want.to_vec(), found: shape.to_vec() });
            }
        } else if allow_classifier && name == "classifier.weight" {
            cls_w = Some((label(), shape.to_vec()));
        } else if allow_classifier && name == "classifier.bias" {
            cls_b = Some((label(), shape.to_vec()));
        } else {
            unexpected.push(label());
        }
    }
    let mut missing: Vec<String> =
        expected.iter().filter(|(n, _)| !seen.contains(n.as_str())).map(|(n, _)| n.clone()).collect();

    let mut classes = None;
    match (cls_w, cls_b) {
        (None, None) => {}
        (Some((wl, w)), b) => {
            let c = w.first().copied().unwrap_or(0);
            if w.len() != 2 || w[1] != FEATURE_DIM || c == 0 {
                misshaped.push(Misshaped { name: wl, expected: vec![c.max(1), FEATURE_DIM], found: w });
            } else {
                classes = Some(c);
            }
            match b {
                None => missing.push("classifier.bias".into()),
                Some((bl, b)) if b != [c] => misshaped.push(Misshaped { name: bl, expected: vec![c], found: b }),
                Some(_) => {}
            }
        }
        (None, Some(_)) => missing.push("classifier.weight".into()),
    }

    let m = Mismatch { arch, source: source.to_owned(), missing, unexpected, misshaped };
    if m.is_empty() { Ok(classes) } else { Err(WeightsError::Mismatch(Box::new(m))) }
}
