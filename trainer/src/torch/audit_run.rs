//! `trainer audit`: label-noise candidates from out-of-fold probabilities (confident learning).
//!
//! Out-of-fold means every item's probabilities come from a model that never saw it. Fine-tuning K networks is what
//! the literature does and what a GPU affords; the default here is cheaper and still out-of-fold: pooled features
//! of a pretrained backbone (which has never seen the catalogue) are computed once, and per head and fold a linear
//! softmax classifier is trained on the other folds. Folds are grouped by duplicate group so a copy of an item never
//! predicts it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use attrd::preprocess::Preprocessor;
use ndarray::{Array2, ArrayView2, s};
use serde::Serialize;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::EffNet;
use super::fit::FitError;
use crate::eval::audit::{self, AuditScore, Filter, RankBy};
use crate::train::data::{Example, HeadSpec};

/// How the audit runs.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Number of folds (≥ 2).
    pub folds: usize,
    /// Seed of folds, probe initialisation and label flips.
    pub seed: u64,
    /// Full-batch optimisation steps of each linear probe.
    pub probe_steps: usize,
    /// L2 penalty (AdamW weight decay) of the probes.
    pub probe_weight_decay: f64,
    /// When set, a copy of each audited head's labels has this fraction flipped first, and the audit's precision and
    /// recall at finding the flips are measured.
    pub flip_rate: Option<f64>,
    pub filter: Filter,
    pub rank_by: RankBy,
    pub batch_size: usize,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            folds: 5,
            seed: 0,
            probe_steps: 300,
            probe_weight_decay: 1e-3,
            flip_rate: None,
            filter: Filter::ConfidentLearning,
            rank_by: RankBy::NormalizedMargin,
            batch_size: 256,
        }
    }
}

/// One head's audit.
#[derive(Debug, Clone, Serialize)]
pub struct HeadAudit {
    pub head: String,
    pub labelled: usize,
    /// Out-of-fold accuracy of the probe (against the audited labels).
    pub oof_accuracy: f64,
    pub estimated_errors: u64,
    pub flagged: usize,
    /// With `flip_rate`: how well the audit found the planted flips.
    pub planted: Option<AuditScore>,
}

/// Pooled backbone features `[N, 1280]` of `examples` (no augmentation, evaluation mode).
pub fn features(
    model: &EffNet,
    examples: &[Example],
    heads: &[HeadSpec],
    pre: &Preprocessor,
    device: Device,
    batch_size: usize,
    progress: impl Fn(usize),
) -> Result<Array2<f32>, FitError> {
    let f = super::fit::pooled_features(model, examples, heads, pre, device, batch_size, false, false, progress)?;
    let out = Vec::<f32>::try_from(f.to_device(Device::Cpu).contiguous().view([-1]))?;
    Array2::from_shape_vec((examples.len(), crate::effnet::FEATURE_DIM), out)
        .map_err(|e| FitError::Tch(tch::TchError::Shape(e.to_string())))
}

/// Out-of-fold probabilities `[N, classes]` of a linear softmax probe on `feats` for `labels` (rows without a label
/// get zeros and are never trained on).
pub fn oof_probabilities(
    feats: ArrayView2<'_, f32>,
    labels: &[Option<usize>],
    classes: usize,
    folds: &[usize],
    opts: &AuditOptions,
    device: Device,
) -> Result<Array2<f32>, FitError> {
    let (n, d) = feats.dim();
    let x_all = Tensor::from_slice(feats.as_slice().unwrap_or(&feats.to_owned().into_raw_vec_and_offset().0))
        .reshape([n as i64, d as i64])
        .to_device(device);
    // Standardise features so one learning rate suits every backbone.
    let mean = x_all.mean_dim([0i64].as_slice(), true, Kind::Float);
    let std = x_all.std_dim([0i64].as_slice(), true, true) + 1e-6;
    let x_all = (x_all - mean) / std;
    let mut out = Array2::<f32>::zeros((n, classes));
    for k in 0..opts.folds {
        let train: Vec<i64> = (0..n).filter(|&i| folds[i] != k && labels[i].is_some()).map(|i| i as i64).collect();
        let held: Vec<usize> = (0..n).filter(|&i| folds[i] == k).collect();
        if held.is_empty() || train.is_empty() {
            continue;
        }
        tch::manual_seed((opts.seed ^ k as u64) as i64);
        let vs = nn::VarStore::new(device);
        let probe = nn::linear(vs.root(), d as i64, classes as i64, Default::default());
        let mut opt = nn::AdamW { wd: opts.probe_weight_decay, ..Default::default() }.build(&vs, 0.05)?;
        let ti = Tensor::from_slice(&train).to_device(device);
        let xt = x_all.index_select(0, &ti);
        let yt = Tensor::from_slice(&train.iter().map(|&i| labels[i as usize].unwrap_or(0) as i64).collect::<Vec<_>>())
            .to_device(device);
        for step in 0..opts.probe_steps {
            // Cosine decay of the step size: the full-batch problem is convex, so this converges reliably.
            let lr = 0.05 * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / opts.probe_steps as f64).cos());
            opt.set_lr(lr.max(1e-4));
            let loss = probe.forward(&xt).cross_entropy_for_logits(&yt);
            opt.backward_step(&loss);
        }
        let hi = Tensor::from_slice(&held.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(device);
        let p = tch::no_grad(|| probe.forward(&x_all.index_select(0, &hi)).softmax(-1, Kind::Float));
        let p: Vec<f32> = Vec::<f32>::try_from(p.to_device(Device::Cpu).contiguous().view([-1]))?;
        for (r, &i) in held.iter().enumerate() {
            out.slice_mut(s![i, ..]).assign(&ndarray::ArrayView1::from(&p[r * classes..(r + 1) * classes]));
        }
    }
    Ok(out)
}

/// Audits every single-label head of `examples` and writes `label_issues.csv` (ranked, with image paths and
/// suggested labels) and `audit.json` into `out_dir`.
#[allow(clippy::too_many_arguments)]
pub fn audit(
    model: &EffNet,
    examples: &[Example],
    heads: &[HeadSpec],
    pre: &Preprocessor,
    device: Device,
    opts: &AuditOptions,
    out_dir: &Path,
    progress: impl Fn(usize),
) -> Result<Vec<HeadAudit>, FitError> {
    std::fs::create_dir_all(out_dir).map_err(|source| FitError::Io { path: out_dir.to_owned(), source })?;
    let feats = features(model, examples, heads, pre, device, opts.batch_size, progress)?;
    let groups: Vec<&str> = examples.iter().map(|e| e.group.as_str()).collect();
    let folds = audit::group_k_fold(&groups, opts.folds, opts.seed)?;
    let csv_path = out_dir.join("label_issues.csv");
    let io = |source| FitError::Io { path: csv_path.clone(), source };
    let mut csv = std::io::BufWriter::new(std::fs::File::create(&csv_path).map_err(io)?);
    writeln!(csv, "rank,head,id,image,given,suggested,self_confidence,score,planted").map_err(io)?;
    let mut results = Vec::new();
    for (h, spec) in heads.iter().enumerate() {
        if spec.multi_label {
            continue;
        }
        let given: Vec<Option<usize>> = examples.iter().map(|e| e.targets[h].class()).collect();
        let labelled = given.iter().flatten().count();
        if labelled == 0 {
            continue;
        }
        let (labels, planted) = match opts.flip_rate {
            Some(rate) => {
                let f = audit::flip_labels(&given, spec.classes.len(), rate, opts.seed ^ h as u64)?;
                let idx = f.indices();
                (f.labels, Some(idx))
            }
            None => (given.clone(), None),
        };
        let probs = oof_probabilities(feats.view(), &labels, spec.classes.len(), &folds, opts, device)?;
        let correct = labels
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.map(|c| crate::eval::argmax(probs.row(i)) == c))
            .filter(|&ok| ok)
            .count();
        let report = audit::find_label_issues(probs.view(), &labels, opts.filter, opts.rank_by)?;
        let planted_set: std::collections::HashSet<usize> = planted.iter().flatten().copied().collect();
        for (rank, issue) in report.issues.iter().enumerate() {
            let e = &examples[issue.index];
            writeln!(
                csv,
                "{},{},{},{},{},{},{:.4},{:.4},{}",
                rank + 1,
                spec.name,
                e.id,
                e.path.display(),
                csv_field(&spec.classes[issue.given]),
                csv_field(&spec.classes[issue.suggested]),
                issue.self_confidence,
                issue.score,
                if planted.is_some() { planted_set.contains(&issue.index).to_string() } else { String::new() }
            )
            .map_err(io)?;
        }
        let score = planted.as_ref().map(|p| audit::measure_audit(&report.ranked_indices(), p, &[50, 100, 500]));
        let r = HeadAudit {
            head: spec.name.clone(),
            labelled,
            oof_accuracy: correct as f64 / labelled as f64,
            estimated_errors: report.estimated_errors,
            flagged: report.issues.len(),
            planted: score,
        };
        tracing::info!(head = %r.head, labelled, oof_accuracy = r.oof_accuracy, flagged = r.flagged,
            precision = r.planted.as_ref().map(|s| s.precision), recall = r.planted.as_ref().map(|s| s.recall),
            "head audited");
        results.push(r);
    }
    csv.flush().map_err(io)?;
    let summary: BTreeMap<&str, serde_json::Value> = [
        ("folds", opts.folds.into()),
        ("seed", opts.seed.into()),
        ("flip_rate", opts.flip_rate.into()),
        ("filter", format!("{:?}", opts.filter).into()),
        ("method", "linear probe on pretrained backbone features, grouped K-fold".into()),
        ("heads", serde_json::to_value(&results).unwrap_or_default()),
    ]
    .into_iter()
    .collect();
    let json_path = out_dir.join("audit.json");
    let bytes = serde_json::to_vec_pretty(&summary).unwrap_or_default();
    std::fs::write(&json_path, bytes).map_err(|source| FitError::Io { path: json_path, source })?;
    Ok(results)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_owned() }
}
