//! `trainer quantize`: calibrate, quantize to INT8 (QDQ), keep the layers that hurt most in fp32 until the accuracy
//! target holds, check that ONNX Runtime really runs integer kernels, and measure what it bought.
//!
//! Everything runs on ONNX Runtime's CPU provider through the same library the daemon loads, so the accuracy measured
//! here is the accuracy served. The graph rewriting itself is [`crate::onnx::quant`].
//!
//! Selection uses the validation split and the final table the test split, so the reported test numbers are not
//! tuned on themselves.

use crate::curate::{Dataset, Split};
use crate::eval::metrics::{multi_label_report, single_label_report};
use crate::onnx::encode_model;
use crate::onnx::proto::ModelProto;
use crate::onnx::quant::{self, ActivationType, CalibrationMethod, Calibrator, QdqSummary, QuantError, WeightRange};
use crate::train::data::{self, HeadSpec, Target};
use crate::train::items_of;
use attrd::preprocess::{InputSpec, Preprocessor};
use ndarray::{Array2, Array4, Axis};
use ort::session::Session;
use ort::value::TensorRef;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Onnx(#[from] crate::onnx::OnnxError),
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error(transparent)]
    Engine(#[from] attrd::engine::EngineError),
    #[error("{0}")]
    Data(String),
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    #[error("the fp32 model produces NaN or infinite values on the calibration set (tensor {0:?})")]
    NonFinite(String),
    #[error(
        "ONNX Runtime's optimized graph has no integer kernels (QLinearConv, QGemm, …): the INT8 model would run in \
         fp32 with extra conversions. Operators seen: {0}"
    )]
    NoIntegerKernels(String),
}

fn ort_err(e: impl std::fmt::Display) -> QuantizeError {
    QuantizeError::Ort(e.to_string())
}

/// Settings of one quantization (CLI flags of `trainer quantize`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantizeConfig {
    pub method: CalibrationMethod,
    /// Storage type of quantized activations (u8 for ONNX Runtime's CPU kernels, s8 for TensorRT).
    pub activations: ActivationType,
    /// How much of the int8 range weights use; see [`WeightRange`].
    #[serde(default)]
    pub weight_range: WeightRange,
    /// Training images the activation ranges are calibrated on.
    pub calibration_items: usize,
    /// Largest acceptable loss of mean macro-F1 (over heads), in points (0.5 = half a percentage point).
    pub max_f1_loss_points: f64,
    /// Validation images used to pick the fp32 layers (all of the split when `None`).
    pub select_items: Option<usize>,
    /// Validation images for the per-layer sensitivity measurement.
    pub sensitivity_items: usize,
    /// Test images for the final table (all when `None`).
    pub test_items: Option<usize>,
    /// Nodes kept in fp32 whatever the analysis says.
    pub keep_fp32: Vec<String>,
    /// Skip the sensitivity analysis and quantize every quantizable node (except `keep_fp32`).
    pub no_sensitivity: bool,
    /// ORT intra-op threads (0 = ORT's default).
    pub threads: usize,
    /// Batch size for calibration and evaluation runs.
    pub batch: usize,
}

impl Default for QuantizeConfig {
    fn default() -> Self {
        Self {
            method: CalibrationMethod::Percentile(99.999),
            activations: ActivationType::U8,
            weight_range: WeightRange::default(),
            calibration_items: 512,
            max_f1_loss_points: 0.5,
            select_items: None,
            sensitivity_items: 256,
            test_items: None,
            keep_fp32: Vec::new(),
            no_sensitivity: false,
            threads: 0,
            batch: 32,
        }
    }
}

/// One head's test-set comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadComparison {
    pub name: String,
    pub items: usize,
    pub fp32_macro_f1: f64,
    pub int8_macro_f1: f64,
    /// Accuracy of a single-label head; micro-F1 of a multi-label head.
    pub fp32_accuracy: f64,
    pub int8_accuracy: f64,
    /// Items whose top-1 differs between the two models (single-label heads).
    pub top1_changed: usize,
}

/// One step of the fp32-layer selection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelectionStep {
    pub kept_fp32: usize,
    pub val_mean_macro_f1: f64,
    pub loss_points: f64,
}

/// Latency of one model on the CPU provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    /// Median milliseconds for one image.
    pub batch1_ms: f64,
    /// Images per second at the evaluation batch size.
    pub throughput: f64,
}

/// Everything `trainer quantize` measured (written as `quantize.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantReport {
    pub config: QuantizeConfig,
    pub calibration_items: usize,
    /// Layers ranked by sensitivity, most sensitive first, with the distortion they alone cause (mean KL divergence
    /// of the heads' softmax, fp32 ‖ layer-quantized).
    pub sensitivity: Vec<(String, f64)>,
    pub selection: Vec<SelectionStep>,
    /// Nodes left in fp32.
    pub kept_fp32: Vec<String>,
    pub qdq: QdqSummary,
    pub val_fp32_mean_macro_f1: f64,
    pub val_int8_mean_macro_f1: f64,
    pub test: Vec<HeadComparison>,
    pub test_fp32_mean_macro_f1: f64,
    pub test_int8_mean_macro_f1: f64,
    pub fp32_latency: Latency,
    pub int8_latency: Latency,
    pub threads: usize,
    /// Operators of ONNX Runtime's optimized INT8 graph (what actually runs).
    pub optimized_ops: BTreeMap<String, usize>,
    pub integer_kernels: usize,
    pub fp32_bytes: usize,
    pub int8_bytes: usize,
}

impl QuantReport {
    /// The per-attribute table as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| attribute | test items | fp32 macro-F1 | INT8 macro-F1 | Δ (points) | fp32 acc | INT8 acc | top-1 changed |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for h in &self.test {
            s += &format!(
                "| {} | {} | {:.2} | {:.2} | {:+.2} | {:.2} | {:.2} | {} |\n",
                h.name,
                h.items,
                100.0 * h.fp32_macro_f1,
                100.0 * h.int8_macro_f1,
                100.0 * (h.int8_macro_f1 - h.fp32_macro_f1),
                100.0 * h.fp32_accuracy,
                100.0 * h.int8_accuracy,
                h.top1_changed
            );
        }
        s += &format!(
            "| **mean** | | {:.2} | {:.2} | {:+.2} | | | |\n\n",
            100.0 * self.test_fp32_mean_macro_f1,
            100.0 * self.test_int8_mean_macro_f1,
            100.0 * (self.test_int8_mean_macro_f1 - self.test_fp32_mean_macro_f1)
        );
        s += &format!(
            "CPU ({} threads): batch 1 {:.2} ms fp32 vs {:.2} ms INT8 ({:.2}×); batch {} {:.0} vs {:.0} images/s \
             ({:.2}×). Model {:.1} MB fp32 → {:.1} MB INT8. {} of {} quantizable layers in INT8 ({} kept fp32); ONNX \
             Runtime runs {} integer kernels. Calibration: {} on {} training images.\n",
            self.threads,
            self.fp32_latency.batch1_ms,
            self.int8_latency.batch1_ms,
            self.fp32_latency.batch1_ms / self.int8_latency.batch1_ms,
            self.config.batch,
            self.fp32_latency.throughput,
            self.int8_latency.throughput,
            self.int8_latency.throughput / self.fp32_latency.throughput,
            self.fp32_bytes as f64 / 1e6,
            self.int8_bytes as f64 / 1e6,
            self.qdq.nodes.values().sum::<usize>(),
            self.qdq.nodes.values().sum::<usize>() + self.kept_fp32.len(),
            self.kept_fp32.len(),
            self.integer_kernels,
            self.config.method,
            self.calibration_items,
        );
        s
    }
}

/// Preprocessed images of one split with their targets, in batches.
struct Images {
    batches: Vec<Array4<f32>>,
    targets: Vec<Vec<Target>>,
}

fn load_split(
    ds: &Dataset,
    split: Split,
    limit: Option<usize>,
    stride_sample: bool,
    pre: &Preprocessor,
    batch: usize,
) -> Result<Images, QuantizeError> {
    let mut items = items_of(ds, split, None);
    if let Some(n) = limit.filter(|&n| n < items.len()) {
        items = if stride_sample {
            // An even spread over the split rather than its first ids.
            let step = items.len() as f64 / n as f64;
            (0..n).map(|i| items[(i as f64 * step) as usize].clone()).collect()
        } else {
            items.into_iter().take(n).collect()
        };
    }
    let (examples, failed) = data::load_examples(items, pre, |_| {});
    if let Some((path, e)) = failed.first() {
        return Err(QuantizeError::Data(format!("{}: {e}", path.display())));
    }
    if examples.is_empty() {
        return Err(QuantizeError::Data(format!("the {split} split has no items")));
    }
    let tensors: Vec<Vec<f32>> = examples.iter().map(|e| pre.to_tensor(&e.image)).collect();
    let batches = tensors.chunks(batch.max(1)).map(|c| pre.batch(c)).collect();
    Ok(Images { batches, targets: examples.into_iter().map(|e| e.targets).collect() })
}

/// One output of a run: its shape and its values, row-major.
type Output = (Vec<usize>, Vec<f32>);

struct Runner {
    session: Session,
    input: String,
    outputs: Vec<String>,
}

impl Runner {
    fn new(model: &ModelProto, input: &str, outputs: &[String], threads: usize) -> Result<Self, QuantizeError> {
        Self::build(model, input, outputs, threads, None)
    }

    fn build(
        model: &ModelProto,
        input: &str,
        outputs: &[String],
        threads: usize,
        optimized: Option<&Path>,
    ) -> Result<Self, QuantizeError> {
        let env = attrd::engine::environment(&attrd::engine::EngineConfig::cpu())?;
        let mut b = attrd::engine::session_builder(&env).map_err(ort_err)?;
        if threads > 0 {
            b = b.with_intra_threads(threads).map_err(ort_err)?;
        }
        if let Some(p) = optimized {
            b = b.with_optimized_model_path(p).map_err(ort_err)?;
        }
        let session = b.commit_from_memory(&encode_model(model)?).map_err(ort_err)?;
        Ok(Self { session, input: input.into(), outputs: outputs.to_vec() })
    }

    /// The named outputs for one batch, each flattened row-major with its shape.
    fn run(&mut self, batch: &Array4<f32>) -> Result<Vec<Output>, QuantizeError> {
        let t = TensorRef::from_array_view(batch.view()).map_err(ort_err)?;
        let out = self.session.run(ort::inputs![self.input.as_str() => t]).map_err(ort_err)?;
        self.outputs
            .iter()
            .map(|name| {
                let v = out.get(name).ok_or_else(|| QuantizeError::Ort(format!("output {name:?} missing")))?;
                let (shape, data) = v.try_extract_tensor::<f32>().map_err(ort_err)?;
                Ok((shape.iter().map(|&d| d.max(0) as usize).collect(), data.to_vec()))
            })
            .collect()
    }

    /// Logits per head for every image of `split`, `[N, C]` each.
    fn logits(&mut self, split: &Images) -> Result<Vec<Array2<f32>>, QuantizeError> {
        let mut per_head: Vec<Vec<f32>> = vec![Vec::new(); self.outputs.len()];
        let mut classes = vec![0; self.outputs.len()];
        for b in &split.batches {
            for (h, (shape, data)) in self.run(b)?.into_iter().enumerate() {
                classes[h] = shape.get(1).copied().unwrap_or(1);
                per_head[h].extend(data);
            }
        }
        let n = split.targets.len();
        per_head
            .into_iter()
            .zip(classes)
            .map(|(d, c)| Array2::from_shape_vec((n, c), d).map_err(|e| QuantizeError::Ort(e.to_string())))
            .collect()
    }
}

/// Macro-F1 and accuracy of each head from its logits (masked targets excluded); heads without labelled items are
/// skipped as `None`.
fn head_scores(heads: &[HeadSpec], logits: &[Array2<f32>], targets: &[Vec<Target>]) -> Vec<Option<(f64, f64)>> {
    heads
        .iter()
        .enumerate()
        .map(|(h, spec)| {
            let l = &logits[h];
            if spec.multi_label {
                let probs = l.mapv(|x| 1.0 / (1.0 + (-x).exp()));
                let t = Array2::from_shape_fn(l.dim(), |(i, c)| match &targets[i][h] {
                    Target::Multi(on) => Some(on.contains(&c)),
                    _ => None,
                });
                let r = multi_label_report(probs.view(), t.view(), &vec![0.5; spec.classes.len()]).ok()?;
                (r.known_cells > 0).then_some((r.averages.macro_avg.f1, r.averages.micro_avg.f1))
            } else {
                let labels: Vec<Option<usize>> = targets.iter().map(|t| t[h].class()).collect();
                let r = single_label_report(l.view(), &labels, &[]).ok()?;
                Some((r.averages.macro_avg.f1, r.accuracy))
            }
        })
        .collect()
}

fn mean_f1(scores: &[Option<(f64, f64)>]) -> f64 {
    let v: Vec<f64> = scores.iter().flatten().map(|s| s.0).collect();
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

/// Mean over items and heads of KL(softmax(reference) ‖ softmax(candidate)): how far a candidate's predictions move.
fn distortion(reference: &[Array2<f32>], candidate: &[Array2<f32>]) -> f64 {
    let softmax = |row: ndarray::ArrayView1<'_, f32>| {
        let m = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let e: Vec<f64> = row.iter().map(|&x| f64::from(x - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(move |v| v / s).collect::<Vec<f64>>()
    };
    let mut total = 0.0;
    let mut count = 0usize;
    for (r, c) in reference.iter().zip(candidate) {
        for (rr, cr) in r.axis_iter(Axis(0)).zip(c.axis_iter(Axis(0))) {
            let (p, q) = (softmax(rr), softmax(cr));
            total += p.iter().zip(&q).filter(|(p, _)| **p > 0.0).map(|(p, q)| p * (p / q.max(1e-12)).ln()).sum::<f64>();
            count += 1;
        }
    }
    if count == 0 { 0.0 } else { total / count as f64 }
}

fn latency(
    model: &ModelProto,
    input: &str,
    outputs: &[String],
    one: &Array4<f32>,
    batch: &Array4<f32>,
    threads: usize,
) -> Result<Latency, QuantizeError> {
    let mut r = Runner::new(model, input, outputs, threads)?;
    for _ in 0..10 {
        r.run(one)?;
    }
    let mut times = Vec::with_capacity(60);
    for _ in 0..60 {
        let t = Instant::now();
        r.run(one)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    r.run(batch)?;
    let t = Instant::now();
    let reps = 5;
    for _ in 0..reps {
        r.run(batch)?;
    }
    let throughput = (reps * batch.shape()[0]) as f64 / t.elapsed().as_secs_f64();
    Ok(Latency { batch1_ms: times[times.len() / 2], throughput })
}

/// Progress messages for long steps.
pub trait Progress {
    fn step(&self, msg: &str);
    fn tick(&self, done: usize, total: usize);
}

/// Quantizes `model` (fp32, one output per head named like the head) against the curated dataset `ds`.
pub fn quantize(
    model: &ModelProto,
    input_spec: &InputSpec,
    input_name: &str,
    heads: &[HeadSpec],
    ds: &Dataset,
    cfg: &QuantizeConfig,
    progress: &dyn Progress,
) -> Result<(ModelProto, QuantReport), QuantizeError> {
    let pre = data::preprocessor(input_spec.clone()).map_err(|e| QuantizeError::Data(e.to_string()))?;
    let outputs: Vec<String> = heads.iter().map(|h| h.name.clone()).collect();
    let threads =
        if cfg.threads > 0 { cfg.threads } else { std::thread::available_parallelism().map_or(1, |n| n.get()) };

    progress.step("loading calibration, validation and test images");
    let calib = load_split(ds, Split::Train, Some(cfg.calibration_items), true, &pre, cfg.batch)?;
    let val = load_split(ds, Split::Val, cfg.select_items, true, &pre, cfg.batch)?;
    let sens = load_split(ds, Split::Val, Some(cfg.sensitivity_items), true, &pre, cfg.batch)?;
    let test = load_split(ds, Split::Test, cfg.test_items, false, &pre, cfg.batch)?;

    // Calibration: every activation, two passes (ranges, then histograms).
    progress.step(&format!("calibrating activation ranges ({}, {} images)", cfg.method, calib.targets.len()));
    let acts = quant::activation_tensors(model)?;
    let probe = quant::with_outputs(model, &acts)?;
    let mut runner = Runner::new(&probe, input_name, &acts, threads)?;
    let mut cal = Calibrator::default();
    let passes = if cfg.method == CalibrationMethod::MinMax { 1 } else { 2 };
    for pass in 0..passes {
        for (i, b) in calib.batches.iter().enumerate() {
            for (name, (_, data)) in acts.iter().zip(runner.run(b)?) {
                if pass == 0 {
                    if data.iter().any(|v| !v.is_finite()) {
                        return Err(QuantizeError::NonFinite(name.clone()));
                    }
                    cal.observe_range(name, &data);
                } else {
                    cal.observe_histogram(name, &data);
                }
            }
            progress.tick(pass * calib.batches.len() + i + 1, passes * calib.batches.len());
        }
    }
    drop(runner);
    let thresholds = cal.thresholds(cfg.method);

    let candidates = quant::quantizable_nodes(model)?;
    let forced: BTreeSet<String> = cfg.keep_fp32.iter().cloned().collect();
    for k in &forced {
        if !candidates.contains(k) {
            return Err(QuantError::UnknownNode(k.clone()).into());
        }
    }
    let build = |keep: &BTreeSet<String>| -> Result<(ModelProto, QdqSummary), QuantizeError> {
        let set: BTreeSet<String> = candidates.iter().filter(|n| !keep.contains(*n)).cloned().collect();
        Ok(quant::quantize_qdq_with(model, &set, &thresholds, cfg.activations, cfg.weight_range)?)
    };

    let mut fp32 = Runner::new(model, input_name, &outputs, threads)?;
    let val_fp32 = mean_f1(&head_scores(heads, &fp32.logits(&val)?, &val.targets));
    let sens_fp32 = fp32.logits(&sens)?;

    // Sensitivity: each layer quantized on its own, everything else fp32.
    let mut sensitivity: Vec<(String, f64)> = Vec::new();
    if !cfg.no_sensitivity {
        progress.step(&format!(
            "sensitivity of {} layers on {} validation images",
            candidates.len(),
            sens.targets.len()
        ));
        for (i, layer) in candidates.iter().enumerate() {
            let one: BTreeSet<String> = [layer.clone()].into();
            let (m, _) = quant::quantize_qdq_with(model, &one, &thresholds, cfg.activations, cfg.weight_range)?;
            let logits = Runner::new(&m, input_name, &outputs, threads)?.logits(&sens)?;
            sensitivity.push((layer.clone(), distortion(&sens_fp32, &logits)));
            progress.tick(i + 1, candidates.len());
        }
        sensitivity.sort_by(|a, b| b.1.total_cmp(&a.1));
    }

    // Selection: keep the k most sensitive layers in fp32, k growing until the validation loss is within target.
    progress.step("choosing the layers to keep in fp32");
    let mut selection = Vec::new();
    let mut k = 0usize;
    let chosen = loop {
        let mut keep = forced.clone();
        keep.extend(sensitivity.iter().take(k).map(|(n, _)| n.clone()));
        let (m, summary) = build(&keep)?;
        let f1 =
            mean_f1(&head_scores(heads, &Runner::new(&m, input_name, &outputs, threads)?.logits(&val)?, &val.targets));
        let loss = 100.0 * (val_fp32 - f1);
        selection.push(SelectionStep { kept_fp32: keep.len(), val_mean_macro_f1: f1, loss_points: loss });
        progress.step(&format!(
            "  {} layers fp32: validation mean macro-F1 {:.2} ({loss:+.2} points)",
            keep.len(),
            100.0 * f1
        ));
        if loss <= cfg.max_f1_loss_points || k >= sensitivity.len() {
            break (m, summary, keep, f1);
        }
        k = if k == 0 { 1 } else { (k * 3).div_ceil(2).min(sensitivity.len()) };
    };
    let (int8_model, qdq, kept, val_int8) = chosen;

    progress.step(&format!("test-set comparison on {} images", test.targets.len()));
    let test_fp32 = fp32.logits(&test)?;
    drop(fp32);
    let test_int8 = Runner::new(&int8_model, input_name, &outputs, threads)?.logits(&test)?;
    let s32 = head_scores(heads, &test_fp32, &test.targets);
    let s8 = head_scores(heads, &test_int8, &test.targets);
    let mut comparison = Vec::new();
    for (h, spec) in heads.iter().enumerate() {
        let (Some(a), Some(b)) = (s32[h], s8[h]) else { continue };
        let argmax =
            |r: ndarray::ArrayView1<'_, f32>| r.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map(|x| x.0);
        let changed = if spec.multi_label {
            0
        } else {
            test_fp32[h]
                .axis_iter(Axis(0))
                .zip(test_int8[h].axis_iter(Axis(0)))
                .filter(|(x, y)| argmax(*x) != argmax(*y))
                .count()
        };
        comparison.push(HeadComparison {
            name: spec.name.clone(),
            items: test.targets.iter().filter(|t| t[h].is_known()).count(),
            fp32_macro_f1: a.0,
            int8_macro_f1: b.0,
            fp32_accuracy: a.1,
            int8_accuracy: b.1,
            top1_changed: changed,
        });
    }

    progress.step("checking ONNX Runtime's optimized graph and measuring CPU latency");
    let dir = tempfile::tempdir().map_err(|e| QuantizeError::Data(e.to_string()))?;
    let opt_path = dir.path().join("optimized.onnx");
    drop(Runner::build(&int8_model, input_name, &outputs, threads, Some(&opt_path))?);
    let optimized = ModelProto::decode(
        std::fs::read(&opt_path)
            .map_err(|e| QuantizeError::Ort(format!("reading the optimized graph: {e}")))?
            .as_slice(),
    )
    .map_err(|e| QuantizeError::Ort(format!("decoding the optimized graph: {e}")))?;
    let optimized_ops = quant::op_counts(&optimized);
    let integer_kernels = quant::integer_kernel_count(&optimized_ops);
    if integer_kernels == 0 && !qdq.nodes.is_empty() {
        let ops = optimized_ops.iter().map(|(k, v)| format!("{k}×{v}")).collect::<Vec<_>>().join(", ");
        return Err(QuantizeError::NoIntegerKernels(ops));
    }
    let one = test.batches[0].slice(ndarray::s![0..1, .., .., ..]).to_owned();
    let fp32_latency = latency(model, input_name, &outputs, &one, &test.batches[0], threads)?;
    let int8_latency = latency(&int8_model, input_name, &outputs, &one, &test.batches[0], threads)?;

    let report = QuantReport {
        config: cfg.clone(),
        calibration_items: calib.targets.len(),
        sensitivity,
        selection,
        kept_fp32: kept.into_iter().collect(),
        qdq,
        val_fp32_mean_macro_f1: val_fp32,
        val_int8_mean_macro_f1: val_int8,
        test_fp32_mean_macro_f1: mean_f1(&s32),
        test_int8_mean_macro_f1: mean_f1(&s8),
        test: comparison,
        fp32_latency,
        int8_latency,
        threads,
        optimized_ops,
        integer_kernels,
        fp32_bytes: encode_model(model)?.len(),
        int8_bytes: encode_model(&int8_model)?.len(),
    };
    Ok((int8_model, report))
}
