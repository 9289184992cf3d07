//! `trainer eval`: the evaluation report of a trained run.
//!
//! [`evaluate`] loads a finished run (`run.json` + `best.safetensors`, see [`fit::load_run`]) and two splits of a
//! curated dataset through the shared preprocessing (exactly the tensors serving computes): the **validation** split
//! for calibration and the evaluated split (the **test** split unless [`EvalOptions::split`] says otherwise). Then,
//! per head:
//! 1. **Temperature**: fitted on the validation logits (NLL, see [`calibrate::fit_temperature`]).
//! 2. **Thresholds**: per class, the smallest threshold on the calibrated validation probability that reaches
//!    [`EvalOptions::target_precision`] with at least [`EvalOptions::min_support`] accepted items
//!    ([`calibrate::thresholds_for_precision`] for single-label heads; for multi-label heads the same rule per class
//!    on the known cells, each class a binary problem). A class that never qualifies gets threshold 1.0 and
//!    `always_abstain`.
//! 3. **Metrics on the evaluated split** (with the calibrated probabilities, which rank classes exactly as the
//!    logits do): single-label heads get accuracy, top-k accuracy (k = 1, 3, 5 as far as the head has classes),
//!    precision/recall/F1 per class and averaged (macro, micro, weighted), the confusion matrix, reliability before and
//!    after temperature scaling (ECE/MCE) and the coverage/accuracy of the thresholds ([`metrics::abstention_report`]);
//!    multi-label heads get per-class binary metrics at their thresholds (and at 0.5 for comparison) and a binary
//!    reliability diagram over all known cells.
//! 4. **Grad-CAM**: a seeded sample of up to [`EvalOptions::gradcam_samples`] right and as many wrong predictions,
//!    each explained for the class the model predicted, composed into one captioned grid per head.
//!
//! Files written into the output directory:
//! - `eval.json` ([`EvalReport`]): everything above, machine-readable; `heads[i].summary` holds the headline numbers.
//! - `calibration.json` ([`Calibration`]): per head the temperature and the per-class thresholds in class order;
//!   this is what `trainer package` puts into the model bundle.
//! - `report.html`: one self-contained page (PNGs embedded as data URIs) for a browser.
//! - `plots/NN_<head>_confusion.png`, `plots/NN_<head>_reliability.png`, `gradcam/NN_<head>.png`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use attrd::preprocess::{InputSpec, Preprocessor};
use base64::Engine as _;
use image::RgbImage;
use ndarray::{Array2, ArrayView2};
use plotters::backend::{BitMapBackend, RGBPixel};
use plotters::prelude::{BLACK, IntoDrawingArea, IntoFont, RGBColor, Text};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::EffNet;
use super::fit::{self, FitError};
use super::gradcam;
use crate::curate::{Dataset, Split};
use crate::effnet::Arch;
use crate::eval::calibrate::{self, ClassThreshold, PrecisionThresholds, Reliability, TemperatureFit};
use crate::eval::metrics::{self, AbstentionReport, MultiLabelReport, SingleLabelReport, TopKAccuracy};
use crate::eval::{EvalError, argmax};
use crate::plot::{self, Heatmap, LineChart, PlotError};
use crate::train::data::{self, Example, HeadSpec, Target};
use crate::train::{self as training, TrainConfig, TrainError};

/// `eval.json`: the machine-readable report.
pub const EVAL_FILE: &str = "eval.json";
/// `calibration.json`: temperatures and thresholds for the bundle.
pub const CALIBRATION_FILE: &str = "calibration.json";
/// `report.html`: the self-contained report.
pub const REPORT_FILE: &str = "report.html";
/// Version of the layouts of `eval.json` and `calibration.json`.
pub const FORMAT_VERSION: u32 = 1;

/// Why an evaluation could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The options are inconsistent.
    #[error("evaluation options: {0}")]
    Options(String),
    /// The run could not be loaded or run.
    #[error(transparent)]
    Fit(#[from] FitError),
    /// The model failed while computing Grad-CAM.
    #[error(transparent)]
    Torch(#[from] super::TorchError),
    /// Preprocessing could not be set up.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The dataset does not fit the run, or a split cannot be used.
    #[error("dataset: {0}")]
    Data(String),
    /// Images of a split could not be read.
    #[error("{failed} of {total} {split} images cannot be read, e.g. {}", .path.display())]
    Images {
        split: Split,
        failed: usize,
        total: usize,
        path: PathBuf,
        #[source]
        source: TrainError,
    },
    /// A metric could not be computed for a head.
    #[error("head {head:?}: {what}")]
    Metrics {
        head: String,
        what: &'static str,
        #[source]
        source: EvalError,
    },
    /// A chart could not be drawn.
    #[error(transparent)]
    Plot(#[from] PlotError),
    /// The Grad-CAM grid could not be drawn.
    #[error("drawing {}: {reason}", .path.display())]
    Draw { path: PathBuf, reason: String },
    /// An image could not be written.
    #[error("writing {}", .path.display())]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    /// A file could not be read or written.
    #[error("{}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io { path: path.to_owned(), source }
}

/// What [`evaluate`] does; [`Default`] gives the `trainer eval` defaults.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The split the report is about: test (default) or val (then calibration and report use the same items, which
    /// flatters the thresholds' coverage and precision).
    pub split: Split,
    /// Precision the per-class thresholds aim for on the calibrated validation probabilities.
    pub target_precision: f64,
    /// Fewest validation items a threshold must accept.
    pub min_support: u64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Equal-width confidence bins of the reliability diagrams.
    pub reliability_bins: usize,
    /// Right and wrong predictions each to explain per head with Grad-CAM (0: no Grad-CAM).
    pub gradcam_samples: usize,
    /// Seed of the Grad-CAM sample.
    pub seed: u64,
    /// Confusion-matrix plots show at most this many true classes (the most frequent).
    pub max_confusion_classes: usize,
    /// Use at most this many items of each split (in id order); unset: all.
    pub max_items: Option<usize>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            split: Split::Test,
            target_precision: 0.9,
            min_support: 5,
            device: "auto".into(),
            batch_size: 64,
            reliability_bins: 15,
            gradcam_samples: 4,
            seed: 0,
            max_confusion_classes: 30,
            max_items: None,
        }
    }
}

impl EvalOptions {
    fn validate(&self) -> Result<(), ReportError> {
        let bad = |m: String| Err(ReportError::Options(m));
        if !(self.target_precision.is_finite() && (0.0..=1.0).contains(&self.target_precision)) {
            return bad(format!("target precision {} is not in [0, 1]", self.target_precision));
        }
        if self.batch_size == 0 || self.reliability_bins == 0 || self.max_confusion_classes == 0 {
            return bad("batch size, reliability bins and confusion classes must be at least 1".into());
        }
        Ok(())
    }
}

/// `calibration.json`: what `trainer package` copies into the bundle manifest. Per head, in model output order:
/// - `temperature`: divide the head's logits by it before softmax (single-label) or sigmoid (multi-label);
/// - `thresholds`: one per class, in the order of `classes`; a class is accepted when its calibrated probability is
///   `>=` its threshold (single-label heads: only the top class is considered; multi-label heads: every class);
/// - `always_abstain`: per class, whether no threshold reached the target precision on the calibration split. Such a
///   class has threshold 1.0 and should never be accepted automatically (a probability can round to exactly 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub format_version: u32,
    /// Fingerprint of the dataset whose validation split was used.
    pub dataset_fingerprint: String,
    /// The split the temperatures and thresholds were fitted on (always `val`).
    pub calibration_split: Split,
    pub target_precision: f64,
    pub min_support: u64,
    pub heads: Vec<HeadCalibration>,
}

/// One head of [`Calibration`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadCalibration {
    pub name: String,
    /// Sigmoid head (several classes at once) rather than softmax head.
    pub multi_label: bool,
    pub classes: Vec<String>,
    /// Finite and `> 0`; 1 when the head has no labelled validation items.
    pub temperature: f64,
    /// One per class, in `[0, 1]`.
    pub thresholds: Vec<f32>,
    /// One per class.
    pub always_abstain: Vec<bool>,
}

/// `eval.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub format_version: u32,
    /// RFC 3339 time the report was made.
    pub generated_at: Option<String>,
    pub run: RunInfo,
    pub dataset: DatasetInfo,
    /// The split the metrics are measured on.
    pub split: Split,
    /// Items of that split that were evaluated.
    pub items: usize,
    /// The split temperatures and thresholds were fitted on (`val`).
    pub calibration_split: Split,
    pub calibration_items: usize,
    pub target_precision: f64,
    pub min_support: u64,
    pub reliability_bins: usize,
    /// Where the model ran.
    pub device: String,
    /// Things the reader must know (dataset mismatch, calibration on the evaluated split).
    pub warnings: Vec<String>,
    /// In model output order.
    pub heads: Vec<HeadEval>,
}

/// The run that was evaluated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub dir: PathBuf,
    pub arch: Arch,
    pub epochs_done: usize,
    /// Epoch whose weights (`best.safetensors`) were evaluated.
    pub best_epoch: usize,
    /// Mean validation macro-F1 of that epoch during training.
    pub best_val_macro_f1: Option<f64>,
    /// Fingerprint of the dataset the run was trained on, when recorded.
    pub dataset_fingerprint: Option<String>,
    pub config: TrainConfig,
}

/// The dataset that was evaluated on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub fingerprint: String,
    pub image_root: PathBuf,
    /// Items per split: train, val, test.
    pub split_items: [usize; 3],
}

/// How many items of the evaluated split have a label for a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LabelCoverage {
    pub labelled: u64,
    pub missing: u64,
    pub not_applicable: u64,
}

/// The headline numbers of a head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadSummary {
    /// Labelled items evaluated.
    pub evaluated: u64,
    /// Fraction of labelled items whose top class is right (single-label heads).
    pub accuracy: Option<f64>,
    /// Single-label: of the argmax predictions; multi-label: at the thresholds.
    pub macro_f1: Option<f64>,
    pub micro_f1: Option<f64>,
    pub weighted_f1: Option<f64>,
    /// Single-label heads: k = 1, 3, 5 as far as the head has classes.
    pub top_k: Vec<TopKAccuracy>,
    /// Expected calibration error at temperature 1 and at the fitted temperature.
    pub ece_before: Option<f64>,
    pub ece_after: Option<f64>,
    pub temperature: f64,
    /// Single-label heads: fraction of labelled items whose top class reaches its threshold.
    pub coverage: Option<f64>,
    /// Single-label heads: accuracy on those items.
    pub accepted_accuracy: Option<f64>,
}

/// Everything measured for one head.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadEval {
    pub name: String,
    pub multi_label: bool,
    pub classes: Vec<String>,
    pub summary: HeadSummary,
    /// Labels of the evaluated split.
    pub labels: LabelCoverage,
    /// Labelled validation items (single-label) or items with known targets (multi-label) used for calibration.
    pub calibration_labelled: u64,
    /// The temperature fit; `None` when the validation split has no labels for the head (temperature 1).
    pub temperature_fit: Option<TemperatureFit>,
    /// Per-class thresholds with their validation statistics. For multi-label heads `predicted` counts the items
    /// with a known target for the class, `accepted` those at or above the threshold.
    pub thresholds: PrecisionThresholds,
    /// Reliability on the evaluated split at temperature 1 and at the fitted temperature (multi-label heads: every
    /// known cell as a binary prediction).
    pub reliability_before: Option<Reliability>,
    pub reliability_after: Option<Reliability>,
    pub single_label: Option<SingleLabelEval>,
    pub multi_label_metrics: Option<MultiLabelEval>,
    pub gradcam: Vec<GradCamSample>,
    pub plots: HeadPlots,
    pub notes: Vec<String>,
}

/// Metrics of a single-label head on the evaluated split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SingleLabelEval {
    /// Argmax metrics; `report.confusion[true][predicted]` counts every labelled item.
    pub report: SingleLabelReport,
    /// What the thresholds do.
    pub abstention: AbstentionReport,
    /// Classes shown in the confusion-matrix plot (rows and columns), in plot order.
    pub confusion_plot_classes: Vec<usize>,
}

/// Metrics of a multi-label head on the evaluated split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MultiLabelEval {
    pub at_thresholds: MultiLabelReport,
    pub at_half: MultiLabelReport,
}

/// One image of a Grad-CAM grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradCamSample {
    pub id: String,
    pub correct: bool,
    /// The label (multi-label: the classes joined with `+`).
    pub truth: String,
    /// The explained class: the model's top class.
    pub predicted: String,
    /// Its calibrated probability.
    pub confidence: f32,
}

/// Plot files of a head, relative to the output directory (`/`-separated).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeadPlots {
    pub confusion: Option<String>,
    pub reliability: Option<String>,
    pub gradcam: Option<String>,
}

/// What [`evaluate`] wrote.
#[derive(Debug, Clone)]
pub struct EvalSummary {
    pub report: EvalReport,
    pub calibration: Calibration,
    pub eval_json: PathBuf,
    pub calibration_json: PathBuf,
    pub html: PathBuf,
}

/// Evaluates the run in `run_dir` on `dataset` and writes `eval.json`, `calibration.json`, `report.html` and the
/// plots into `out_dir` (created if needed). See the module documentation.
pub fn evaluate(
    run_dir: &Path,
    dataset: &Dataset,
    opts: &EvalOptions,
    out_dir: &Path,
) -> Result<EvalSummary, ReportError> {
    opts.validate()?;
    let device = fit::device(&opts.device)?;
    let (state, _vs, model) = fit::load_run(run_dir, device)?;
    let heads = &state.heads;
    if training::heads_of(dataset) != *heads {
        return Err(ReportError::Data(format!(
            "the dataset's attributes ({}) are not the run's heads ({}) with the same classes in the same order",
            training::heads_of(dataset).iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", "),
            heads.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    let spec = state.config.input_spec();
    let pre = data::preprocessor(spec.clone())?;
    let mut warnings = Vec::new();
    match &state.dataset_fingerprint {
        Some(f) if *f != dataset.fingerprint => {
            let w = format!(
                "the run was trained on dataset {f}, not on {} (the evaluated split may overlap its training items)",
                dataset.fingerprint
            );
            tracing::warn!("{w}");
            warnings.push(w);
        }
        None => warnings.push("the run did not record its dataset fingerprint".into()),
        Some(_) => {}
    }
    if opts.split != Split::Test {
        warnings.push(format!(
            "evaluated on the {} split; temperatures and thresholds were fitted on the val split{}",
            opts.split,
            if opts.split == Split::Val {
                " too, so coverage and precision at the thresholds are optimistic"
            } else {
                ""
            }
        ));
    }

    let started = std::time::Instant::now();
    let val = load_split(dataset, Split::Val, &pre, opts.max_items)?;
    let test_owned =
        if opts.split == Split::Val { None } else { Some(load_split(dataset, opts.split, &pre, opts.max_items)?) };
    let test: &[Example] = test_owned.as_deref().unwrap_or(&val);
    if val.is_empty() {
        return Err(ReportError::Data("the val split is empty: nothing to calibrate on".into()));
    }
    if test.is_empty() {
        return Err(ReportError::Data(format!("the {} split is empty: nothing to evaluate", opts.split)));
    }
    tracing::info!(val = val.len(), evaluated = test.len(), split = %opts.split,
        seconds = started.elapsed().as_secs_f64(), "decoded images");

    let predict = |ex: &[Example]| fit::predict_logits(&model, ex, heads, &pre, device, opts.batch_size, false, false);
    let val_logits = predict(&val)?;
    let test_logits = if test_owned.is_some() { predict(test)? } else { val_logits.clone() };
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "predicted");

    for dir in [out_dir.to_path_buf(), out_dir.join("plots"), out_dir.join("gradcam")] {
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    }
    let ctx = Ctx { opts, out: out_dir, model: &model, pre: &pre, spec: &spec, device, heads, test };
    let mut head_evals = Vec::with_capacity(heads.len());
    for (h, head) in heads.iter().enumerate() {
        let e = if head.multi_label {
            ctx.multi_label_head(h, &val, val_logits[h].view(), test_logits[h].view())?
        } else {
            ctx.single_label_head(h, &val, val_logits[h].view(), test_logits[h].view())?
        };
        tracing::info!(head = %head.name, accuracy = ?e.summary.accuracy, macro_f1 = ?e.summary.macro_f1,
            temperature = e.summary.temperature, "head evaluated");
        head_evals.push(e);
    }

    let calibration = Calibration {
        format_version: FORMAT_VERSION,
        dataset_fingerprint: dataset.fingerprint.clone(),
        calibration_split: Split::Val,
        target_precision: opts.target_precision,
        min_support: opts.min_support,
        heads: head_evals
            .iter()
            .map(|e| HeadCalibration {
                name: e.name.clone(),
                multi_label: e.multi_label,
                classes: e.classes.clone(),
                temperature: e.summary.temperature,
                thresholds: e.thresholds.thresholds(),
                always_abstain: e.thresholds.classes.iter().map(|c| c.always_abstain).collect(),
            })
            .collect(),
    };
    let count = |s: Split| dataset.items(s).count();
    let report = EvalReport {
        format_version: FORMAT_VERSION,
        generated_at: time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).ok(),
        run: RunInfo {
            dir: run_dir.to_owned(),
            arch: state.arch,
            epochs_done: state.epochs_done,
            best_epoch: state.best_epoch,
            best_val_macro_f1: Some(state.best_val_f1).filter(|f| f.is_finite()),
            dataset_fingerprint: state.dataset_fingerprint.clone(),
            config: state.config.clone(),
        },
        dataset: DatasetInfo {
            fingerprint: dataset.fingerprint.clone(),
            image_root: dataset.image_root.clone(),
            split_items: [count(Split::Train), count(Split::Val), count(Split::Test)],
        },
        split: opts.split,
        items: test.len(),
        calibration_split: Split::Val,
        calibration_items: val.len(),
        target_precision: opts.target_precision,
        min_support: opts.min_support,
        reliability_bins: opts.reliability_bins,
        device: format!("{device:?}"),
        warnings,
        heads: head_evals,
    };
    let eval_json = out_dir.join(EVAL_FILE);
    write_json(&eval_json, &report)?;
    let calibration_json = out_dir.join(CALIBRATION_FILE);
    write_json(&calibration_json, &calibration)?;
    let html = out_dir.join(REPORT_FILE);
    let page = render_html(&report, out_dir)?;
    std::fs::write(&html, page).map_err(io_err(&html))?;
    tracing::info!(out = %out_dir.display(), seconds = started.elapsed().as_secs_f64(), "evaluation written");
    Ok(EvalSummary { report, calibration, eval_json, calibration_json, html })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ReportError> {
    // Invariant: the reports hold only strings, numbers (non-finite ones become null), lists and maps.
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| ReportError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    std::fs::write(path, bytes).map_err(io_err(path))
}

/// Decodes a split's images with the shared decoder; any unreadable image is an error.
fn load_split(
    ds: &Dataset,
    split: Split,
    pre: &Preprocessor,
    limit: Option<usize>,
) -> Result<Vec<Example>, ReportError> {
    let items = training::items_of(ds, split, limit);
    let total = items.len();
    let (ok, mut failed) = data::load_examples(items, pre, |_| {});
    let n = failed.len();
    match failed.pop() {
        Some((path, source)) => Err(ReportError::Images { split, failed: n, total, path, source }),
        None => Ok(ok),
    }
}

/// Labels of a single-label head (`None`: missing or not applicable).
fn single_labels(examples: &[Example], h: usize) -> Vec<Option<usize>> {
    examples.iter().map(|e| e.targets[h].class()).collect()
}

/// Targets of a multi-label head (`None`: unknown).
fn multi_targets(examples: &[Example], h: usize, classes: usize) -> Array2<Option<bool>> {
    Array2::from_shape_fn((examples.len(), classes), |(i, k)| match &examples[i].targets[h] {
        Target::Multi(on) => Some(on.contains(&k)),
        _ => None,
    })
}

fn coverage(examples: &[Example], h: usize) -> LabelCoverage {
    let mut c = LabelCoverage::default();
    for e in examples {
        match e.targets[h] {
            Target::Class(_) | Target::Multi(_) => c.labelled += 1,
            Target::Missing => c.missing += 1,
            Target::NotApplicable => c.not_applicable += 1,
        }
    }
    c
}

/// Thresholds that accept nothing: for heads without labelled validation items.
fn abstain_everywhere(classes: usize, target_precision: f64, min_support: u64) -> PrecisionThresholds {
    PrecisionThresholds {
        target_precision,
        min_support,
        classes: (0..classes)
            .map(|_| ClassThreshold {
                threshold: 1.0,
                always_abstain: true,
                predicted: 0,
                accepted: 0,
                precision: None,
            })
            .collect(),
    }
}

/// Per-class thresholds of a multi-label head, each class on its own: the smallest `t` among the observed
/// probabilities such that the known cells with `p >= t` number at least `min_support` and are positive with a
/// fraction `>= target_precision` (ties are never split). Classes where no `t` qualifies get 1.0 and
/// `always_abstain`. `predicted` counts the known cells of the class.
fn multi_label_thresholds(
    probs: ArrayView2<'_, f32>,
    targets: ArrayView2<'_, Option<bool>>,
    target_precision: f64,
    min_support: u64,
) -> PrecisionThresholds {
    let classes = (0..targets.ncols())
        .map(|c| {
            let cells = probs.column(c).iter().zip(targets.column(c)).filter_map(|(&p, t)| t.map(|y| (p, y))).collect();
            ClassThreshold::smallest_reaching(cells, target_precision, min_support)
        })
        .collect();
    PrecisionThresholds { target_precision, min_support, classes }
}

/// Reliability of a multi-label head: every known cell is a binary prediction with confidence `max(p, 1 - p)`.
fn binary_reliability(
    probs: ArrayView2<'_, f32>,
    targets: ArrayView2<'_, Option<bool>>,
    bins: usize,
) -> Result<Reliability, EvalError> {
    let cells: Vec<(f32, bool)> = probs.iter().zip(targets).filter_map(|(&p, t)| t.map(|y| (p, y))).collect();
    let two = Array2::from_shape_fn((cells.len(), 2), |(i, k)| if k == 1 { cells[i].0 } else { 1.0 - cells[i].0 });
    let labels: Vec<Option<usize>> = cells.iter().map(|&(_, y)| Some(usize::from(y))).collect();
    calibrate::reliability(two.view(), &labels, bins)
}

/// Classes shown in the confusion-matrix plot: all of them in class order when there are at most `max`, otherwise
/// the `max` with the most labelled items, most frequent first (ties by class index).
fn confusion_plot_classes(confusion: &[Vec<u64>], max: usize) -> Vec<usize> {
    let n = confusion.len();
    if n <= max {
        return (0..n).collect();
    }
    let support: Vec<u64> = confusion.iter().map(|r| r.iter().sum()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| support[b].cmp(&support[a]).then(a.cmp(&b)));
    order.truncate(max);
    order
}

/// The confusion matrix restricted to `shown` rows and columns, each row divided by its full count (NaN for a class
/// without items); when classes are hidden a last column holds the fraction predicted as any hidden class.
fn normalised_confusion(confusion: &[Vec<u64>], shown: &[usize]) -> Vec<Vec<f64>> {
    let hidden = shown.len() < confusion.len();
    shown
        .iter()
        .map(|&r| {
            let row = &confusion[r];
            let total: u64 = row.iter().sum();
            let frac = |v: u64| if total > 0 { v as f64 / total as f64 } else { f64::NAN };
            let mut out: Vec<f64> = shown.iter().map(|&c| frac(row[c])).collect();
            if hidden {
                let in_shown: u64 = shown.iter().map(|&c| row[c]).sum();
                out.push(frac(total - in_shown));
            }
            out
        })
        .collect()
}

/// A file-name-safe form of a head name, prefixed with its index so names that sanitise alike stay apart.
fn file_stem(h: usize, name: &str) -> String {
    let safe: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("{h:02}_{safe}")
}

/// What every head's evaluation needs.
struct Ctx<'a> {
    opts: &'a EvalOptions,
    out: &'a Path,
    model: &'a EffNet,
    pre: &'a Preprocessor,
    spec: &'a InputSpec,
    device: Device,
    heads: &'a [HeadSpec],
    /// The evaluated split.
    test: &'a [Example],
}

/// A test item picked for Grad-CAM.
struct CamPick {
    index: usize,
    class: usize,
    correct: bool,
    confidence: f32,
    truth: String,
}

impl Ctx<'_> {
    fn metrics_err(&self, h: usize, what: &'static str) -> impl FnOnce(EvalError) -> ReportError + '_ {
        move |source| ReportError::Metrics { head: self.heads[h].name.clone(), what, source }
    }

    /// A head's evaluation before the test split is measured: its calibration, the notes on it, the test split's
    /// label coverage, and a summary the caller fills in. When the split has no labelled items it is complete, with
    /// a note saying so.
    fn head_eval(
        &self,
        h: usize,
        calibration_labelled: u64,
        temperature_fit: Option<TemperatureFit>,
        thresholds: PrecisionThresholds,
        mut notes: Vec<String>,
    ) -> HeadEval {
        let (opts, head) = (self.opts, &self.heads[h]);
        let temperature = temperature_fit.as_ref().map_or(1.0, |f| f.temperature);
        if temperature_fit.as_ref().is_some_and(|f| f.at_bound) {
            notes.push(format!(
                "the temperature fit stopped at its bound ({temperature}): the validation set is too easy or too small"
            ));
        }
        let abstaining = thresholds.classes.iter().filter(|c| c.always_abstain).count();
        if abstaining > 0 {
            let outcome = if head.multi_label { "are never predicted" } else { "always abstain" };
            notes.push(format!(
                "{abstaining} of {} classes never reach precision {} with {} validation items and {outcome}",
                head.classes.len(),
                opts.target_precision,
                opts.min_support
            ));
        }
        let coverage = coverage(self.test, h);
        if coverage.labelled == 0 {
            notes.push(format!("no labelled items in the {} split: nothing to measure", opts.split));
        }
        HeadEval {
            name: head.name.clone(),
            multi_label: head.multi_label,
            classes: head.classes.clone(),
            summary: HeadSummary {
                evaluated: coverage.labelled,
                accuracy: None,
                macro_f1: None,
                micro_f1: None,
                weighted_f1: None,
                top_k: Vec::new(),
                ece_before: None,
                ece_after: None,
                temperature,
                coverage: None,
                accepted_accuracy: None,
            },
            labels: coverage,
            calibration_labelled,
            temperature_fit,
            thresholds,
            reliability_before: None,
            reliability_after: None,
            single_label: None,
            multi_label_metrics: None,
            gradcam: Vec::new(),
            plots: HeadPlots::default(),
            notes,
        }
    }

    fn single_label_head(
        &self,
        h: usize,
        val: &[Example],
        val_logits: ArrayView2<'_, f32>,
        test_logits: ArrayView2<'_, f32>,
    ) -> Result<HeadEval, ReportError> {
        let (opts, head) = (self.opts, &self.heads[h]);
        let classes = head.classes.len();
        let mut notes = Vec::new();
        let val_labels = single_labels(val, h);
        let calibration_labelled = val_labels.iter().flatten().count() as u64;
        let (temperature_fit, thresholds) = if calibration_labelled > 0 {
            let fit =
                calibrate::fit_temperature(val_logits, &val_labels).map_err(self.metrics_err(h, "temperature"))?;
            let probs = calibrate::softmax(val_logits, fit.temperature).map_err(self.metrics_err(h, "softmax"))?;
            let thr =
                calibrate::thresholds_for_precision(probs.view(), &val_labels, opts.target_precision, opts.min_support)
                    .map_err(self.metrics_err(h, "thresholds"))?;
            (Some(fit), thr)
        } else {
            notes.push("no labelled validation items: temperature 1 and every class abstains".to_string());
            (None, abstain_everywhere(classes, opts.target_precision, opts.min_support))
        };
        let temperature = temperature_fit.as_ref().map_or(1.0, |f| f.temperature);
        let labels = single_labels(self.test, h);
        let mut e = self.head_eval(h, calibration_labelled, temperature_fit, thresholds, notes);
        if e.labels.labelled == 0 {
            return Ok(e);
        }
        let raw = calibrate::softmax(test_logits, 1.0).map_err(self.metrics_err(h, "softmax"))?;
        let cal = calibrate::softmax(test_logits, temperature).map_err(self.metrics_err(h, "softmax"))?;
        let ks: Vec<usize> = [1, 3, 5].into_iter().filter(|&k| k <= classes).collect();
        let report = metrics::single_label_report(cal.view(), &labels, &ks).map_err(self.metrics_err(h, "metrics"))?;
        let bins = opts.reliability_bins;
        let before = calibrate::reliability(raw.view(), &labels, bins).map_err(self.metrics_err(h, "reliability"))?;
        let after = calibrate::reliability(cal.view(), &labels, bins).map_err(self.metrics_err(h, "reliability"))?;
        let abstention = metrics::abstention_report(cal.view(), &labels, &e.thresholds.thresholds())
            .map_err(self.metrics_err(h, "abstention"))?;

        let stem = file_stem(h, &head.name);
        let shown = confusion_plot_classes(&report.confusion, opts.max_confusion_classes);
        let mut col_labels: Vec<String> = shown.iter().map(|&c| head.classes[c].clone()).collect();
        let title = if shown.len() < classes {
            col_labels.push("(other classes)".into());
            format!("{}: confusion, {} most frequent of {classes} classes (row-normalised)", head.name, shown.len())
        } else {
            format!("{}: confusion (row-normalised)", head.name)
        };
        let confusion_file = format!("plots/{stem}_confusion.png");
        plot::heatmap(
            &Heatmap {
                title,
                row_axis: "true class".into(),
                col_axis: "predicted class".into(),
                row_labels: shown.iter().map(|&c| head.classes[c].clone()).collect(),
                col_labels,
                values: normalised_confusion(&report.confusion, &shown),
                annotate: true,
            },
            &self.out.join(&confusion_file),
        )?;
        let reliability_file = format!("plots/{stem}_reliability.png");
        self.reliability_chart(&head.name, "items", &before, &after, temperature, &reliability_file)?;

        let picks: Vec<CamPick> = labels
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let y = (*l)?;
                let best = argmax(cal.row(i));
                Some(CamPick {
                    index: i,
                    class: best,
                    correct: best == y,
                    confidence: cal[[i, best]],
                    truth: head.classes[y].clone(),
                })
            })
            .collect();
        let gradcam_file = format!("gradcam/{stem}.png");
        e.gradcam = self.gradcam_grid(h, picks, &gradcam_file)?;

        e.summary = HeadSummary {
            evaluated: report.evaluated,
            accuracy: Some(report.accuracy),
            macro_f1: Some(report.averages.macro_avg.f1),
            micro_f1: Some(report.averages.micro_avg.f1),
            weighted_f1: Some(report.averages.weighted_avg.f1),
            top_k: report.top_k.clone(),
            ece_before: Some(before.ece),
            ece_after: Some(after.ece),
            temperature,
            coverage: Some(abstention.coverage),
            accepted_accuracy: abstention.accepted_accuracy,
        };
        e.reliability_before = Some(before);
        e.reliability_after = Some(after);
        e.single_label = Some(SingleLabelEval { report, abstention, confusion_plot_classes: shown });
        e.plots = HeadPlots {
            confusion: Some(confusion_file),
            reliability: Some(reliability_file),
            gradcam: (!e.gradcam.is_empty()).then_some(gradcam_file),
        };
        Ok(e)
    }

    fn multi_label_head(
        &self,
        h: usize,
        val: &[Example],
        val_logits: ArrayView2<'_, f32>,
        test_logits: ArrayView2<'_, f32>,
    ) -> Result<HeadEval, ReportError> {
        let (opts, head) = (self.opts, &self.heads[h]);
        let classes = head.classes.len();
        let mut notes = Vec::new();
        let val_targets = multi_targets(val, h, classes);
        let calibration_labelled = val.iter().filter(|e| e.targets[h].is_known()).count() as u64;
        let (temperature_fit, thresholds) = if calibration_labelled > 0 {
            let fit = calibrate::fit_temperature_multi_label(val_logits, val_targets.view())
                .map_err(self.metrics_err(h, "temperature"))?;
            let probs = calibrate::sigmoid(val_logits, fit.temperature).map_err(self.metrics_err(h, "sigmoid"))?;
            let thr = multi_label_thresholds(probs.view(), val_targets.view(), opts.target_precision, opts.min_support);
            (Some(fit), thr)
        } else {
            notes.push("no labelled validation items: temperature 1 and every class abstains".to_string());
            (None, abstain_everywhere(classes, opts.target_precision, opts.min_support))
        };
        let temperature = temperature_fit.as_ref().map_or(1.0, |f| f.temperature);
        let targets = multi_targets(self.test, h, classes);
        let mut e = self.head_eval(h, calibration_labelled, temperature_fit, thresholds, notes);
        if e.labels.labelled == 0 {
            return Ok(e);
        }
        let raw = calibrate::sigmoid(test_logits, 1.0).map_err(self.metrics_err(h, "sigmoid"))?;
        let cal = calibrate::sigmoid(test_logits, temperature).map_err(self.metrics_err(h, "sigmoid"))?;
        let at_thresholds = metrics::multi_label_report(cal.view(), targets.view(), &e.thresholds.thresholds())
            .map_err(self.metrics_err(h, "metrics"))?;
        let at_half = metrics::multi_label_report(cal.view(), targets.view(), &vec![0.5; classes])
            .map_err(self.metrics_err(h, "metrics"))?;
        let bins = opts.reliability_bins;
        let before =
            binary_reliability(raw.view(), targets.view(), bins).map_err(self.metrics_err(h, "reliability"))?;
        let after = binary_reliability(cal.view(), targets.view(), bins).map_err(self.metrics_err(h, "reliability"))?;

        let stem = file_stem(h, &head.name);
        let reliability_file = format!("plots/{stem}_reliability.png");
        self.reliability_chart(&head.name, "item x class cells", &before, &after, temperature, &reliability_file)?;
        let picks: Vec<CamPick> = self
            .test
            .iter()
            .enumerate()
            .filter_map(|(i, ex)| {
                let Target::Multi(on) = &ex.targets[h] else { return None };
                let best = argmax(cal.row(i));
                let truth: Vec<&str> = on.iter().map(|&c| head.classes[c].as_str()).collect();
                Some(CamPick {
                    index: i,
                    class: best,
                    correct: on.contains(&best),
                    confidence: cal[[i, best]],
                    truth: if truth.is_empty() { "(none)".into() } else { truth.join("+") },
                })
            })
            .collect();
        let gradcam_file = format!("gradcam/{stem}.png");
        e.gradcam = self.gradcam_grid(h, picks, &gradcam_file)?;

        let a = &at_thresholds.averages;
        e.summary.macro_f1 = Some(a.macro_avg.f1);
        e.summary.micro_f1 = Some(a.micro_avg.f1);
        e.summary.weighted_f1 = Some(a.weighted_avg.f1);
        e.summary.ece_before = Some(before.ece);
        e.summary.ece_after = Some(after.ece);
        e.reliability_before = Some(before);
        e.reliability_after = Some(after);
        e.multi_label_metrics = Some(MultiLabelEval { at_thresholds, at_half });
        e.plots = HeadPlots {
            confusion: None,
            reliability: Some(reliability_file),
            gradcam: (!e.gradcam.is_empty()).then_some(gradcam_file),
        };
        Ok(e)
    }

    /// Reliability diagram before and after temperature scaling, with the diagonal of perfect calibration.
    fn reliability_chart(
        &self,
        head: &str,
        unit: &str,
        before: &Reliability,
        after: &Reliability,
        temperature: f64,
        file: &str,
    ) -> Result<(), ReportError> {
        let points = |r: &Reliability| -> Vec<(f64, f64)> {
            r.bins.iter().filter_map(|b| Some((b.mean_confidence?, b.accuracy?))).collect()
        };
        let chart = LineChart {
            title: format!("{head}: reliability on {} {unit} ({} split)", before.items, self.opts.split),
            x_label: "confidence".into(),
            y_label: "accuracy".into(),
            series: vec![
                ("perfect calibration".into(), vec![(0.0, 0.0), (1.0, 1.0)]),
                (format!("T = 1: ECE {:.3}", before.ece), points(before)),
                (format!("T = {temperature:.3}: ECE {:.3}", after.ece), points(after)),
            ],
        };
        Ok(plot::line_chart(&chart, &self.out.join(file))?)
    }

    /// Explains a seeded sample of right and wrong predictions and writes them as one captioned grid.
    fn gradcam_grid(&self, h: usize, picks: Vec<CamPick>, file: &str) -> Result<Vec<GradCamSample>, ReportError> {
        let n = self.opts.gradcam_samples;
        if n == 0 || picks.is_empty() {
            return Ok(Vec::new());
        }
        let mut rng = StdRng::seed_from_u64(self.opts.seed ^ (h as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (right, wrong): (Vec<CamPick>, Vec<CamPick>) = picks.into_iter().partition(|p| p.correct);
        let mut rows: Vec<Vec<CamPick>> = Vec::with_capacity(2);
        for mut group in [right, wrong] {
            group.shuffle(&mut rng);
            group.truncate(n);
            rows.push(group);
        }
        let chosen: Vec<&CamPick> = rows.iter().flatten().collect();
        let indices: Vec<usize> = chosen.iter().map(|p| p.index).collect();
        let batch = data::make_batch(self.test, &indices, self.heads, self.pre, None);
        let (height, width) = (i64::from(self.spec.height), i64::from(self.spec.width));
        let xs = Tensor::from_slice(&batch.images).reshape([batch.n as i64, 3, height, width]).to_device(self.device);
        let explained: Vec<i64> = chosen.iter().map(|p| p.class as i64).collect();
        let cams = gradcam::grad_cam(self.model, &xs, h, &explained)?;
        let chw = 3 * (height * width) as usize;
        let mut tiles = cams
            .iter()
            .enumerate()
            .map(|(i, cam)| gradcam::overlay(&batch.images[i * chw..(i + 1) * chw], self.spec, cam, 0.5));
        let classes = &self.heads[h].classes;
        let mut samples = Vec::with_capacity(chosen.len());
        let mut grid_rows = Vec::with_capacity(rows.len());
        for (r, row) in rows.iter().enumerate() {
            let mut cells = Vec::with_capacity(row.len());
            for p in row {
                // Invariant: one heat map per chosen item, in the same order as `rows` flattened.
                let Some(tile) = tiles.next() else { break };
                let predicted = classes[p.class].clone();
                cells.push((tile, [format!("true: {}", p.truth), format!("pred: {predicted} {:.2}", p.confidence)]));
                samples.push(GradCamSample {
                    id: self.test[p.index].id.clone(),
                    correct: p.correct,
                    truth: p.truth.clone(),
                    predicted,
                    confidence: p.confidence,
                });
            }
            let label = if r == 0 { "right" } else { "wrong" };
            grid_rows.push((format!("{label} ({} shown)", cells.len()), cells));
        }
        let path = self.out.join(file);
        let title = format!("{}: Grad-CAM of the predicted class", self.heads[h].name);
        draw_grid(&title, grid_rows, &path)?;
        Ok(samples)
    }
}

/// Family name the caption font is registered under with plotters (separate from `plot`'s registration, so the
/// grid does not depend on a chart having been drawn first).
const CAPTION_FONT: &str = "attrd-report-sans";
static CAPTION_FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans-subset.ttf");

fn caption_font() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        plotters::style::register_font(CAPTION_FONT, plotters::style::FontStyle::Normal, CAPTION_FONT_BYTES).is_ok()
    })
}

/// A grid row: its heading and its cells (image, two caption lines).
type GridRow = (String, Vec<(RgbImage, [String; 2])>);

/// Tiles the images of each row left to right (scaled so the longer side is `TILE` pixels), with the row heading
/// above and two caption lines under each image, and writes the PNG.
fn draw_grid(title: &str, rows: Vec<GridRow>, path: &Path) -> Result<(), ReportError> {
    const TILE: u32 = 192;
    const PAD: u32 = 10;
    const TITLE_H: u32 = 30;
    const HEADING_H: u32 = 24;
    const CAPTION_H: u32 = 36;
    let draw_err = |reason: String| ReportError::Draw { path: path.to_owned(), reason };
    let scaled: Vec<GridRow> = rows
        .into_iter()
        .map(|(heading, cells)| {
            let cells = cells
                .into_iter()
                .map(|(img, caption)| {
                    let (w, h) = img.dimensions();
                    let s = f64::from(TILE) / f64::from(w.max(h).max(1));
                    let (nw, nh) =
                        (((f64::from(w) * s).round() as u32).max(1), ((f64::from(h) * s).round() as u32).max(1));
                    (image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle), caption)
                })
                .collect();
            (heading, cells)
        })
        .collect();
    let cols = scaled.iter().map(|(_, c)| c.len()).max().unwrap_or(0).max(1) as u32;
    let tile_h = scaled.iter().flat_map(|(_, c)| c.iter().map(|(i, _)| i.height())).max().unwrap_or(TILE);
    let width = PAD + cols * (TILE + PAD);
    let row_h = HEADING_H + tile_h + CAPTION_H + PAD;
    let height = TITLE_H + scaled.len() as u32 * row_h + PAD;
    let mut canvas = RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    for (r, (_, cells)) in scaled.iter().enumerate() {
        let y = TITLE_H + r as u32 * row_h + HEADING_H;
        for (c, (img, _)) in cells.iter().enumerate() {
            image::imageops::replace(&mut canvas, img, i64::from(PAD + c as u32 * (TILE + PAD)), i64::from(y));
        }
    }
    let mut buf = canvas.into_raw();
    if caption_font() {
        let backend = BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut buf, (width, height))
            .map_err(|e| draw_err(e.to_string()))?;
        let root = backend.into_drawing_area();
        let text = |s: &str, x: u32, y: u32, size: u32, colour: &RGBColor| {
            let style = (CAPTION_FONT, size).into_font().color(colour);
            root.draw(&Text::new(s.to_owned(), (x as i32, y as i32), style)).map_err(|e| draw_err(e.to_string()))
        };
        text(title, PAD, 8, 16, &BLACK)?;
        let grey = RGBColor(90, 90, 90);
        for (r, (heading, cells)) in scaled.iter().enumerate() {
            let y = TITLE_H + r as u32 * row_h;
            text(heading, PAD, y + 4, 14, &BLACK)?;
            for (c, (img, caption)) in cells.iter().enumerate() {
                let x = PAD + c as u32 * (TILE + PAD);
                let y = y + HEADING_H + img.height() + 3;
                text(&fit_caption(&caption[0]), x, y, 12, &grey)?;
                text(&fit_caption(&caption[1]), x, y + 16, 12, &BLACK)?;
            }
        }
        root.present().map_err(|e| draw_err(e.to_string()))?;
    } else {
        tracing::warn!("the embedded caption font does not parse; Grad-CAM grids are drawn without captions");
    }
    let img =
        RgbImage::from_raw(width, height, buf).ok_or_else(|| draw_err("image buffer has the wrong size".into()))?;
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|source| ReportError::Image { path: path.to_owned(), source })
}

/// Shortens a caption to what fits under a tile at 12 px.
fn fit_caption(s: &str) -> String {
    const MAX: usize = 28;
    if s.chars().count() <= MAX { s.to_owned() } else { s.chars().take(MAX - 3).collect::<String>() + "..." }
}

/// HTML-escapes text for element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "&ndash;".into(), |v| format!("{:.1}", 100.0 * v))
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "&ndash;".into(), |v| format!("{v:.digits$}"))
}

/// An `<img>` with the PNG at `out/rel` embedded as a data URI.
fn embedded_png(out: &Path, rel: &str, alt: &str) -> Result<String, ReportError> {
    let path = out.join(rel);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    Ok(format!(
        "<img alt=\"{}\" src=\"data:image/png;base64,{}\">",
        esc(alt),
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}\
th{background:#f0f0f0}td.l,th.l{text-align:left}.warn{background:#fff3cd;border:1px solid #e0c060;padding:.5em 1em}\
.note{color:#555}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}pre{background:#f6f6f6;padding:1em;\
overflow:auto}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}nav a{margin-right:1em}";

/// The self-contained HTML report; plots are read from `out` and embedded.
fn render_html(r: &EvalReport, out: &Path) -> Result<String, ReportError> {
    use std::fmt::Write as _;
    let mut s = String::new();
    let run = esc(&r.run.dir.display().to_string());
    // Writing into a String cannot fail; `let _ =` keeps that explicit.
    let _ = write!(
        s,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Evaluation of {run}</title>\
         <style>{STYLE}</style></head><body>\n<h1>Evaluation of {run}</h1>\n"
    );
    for w in &r.warnings {
        let _ = writeln!(s, "<p class=\"warn\">{}</p>", esc(w));
    }
    let [tr, va, te] = r.dataset.split_items;
    let kv = [
        ("dataset fingerprint", esc(&r.dataset.fingerprint)),
        ("trained on", esc(r.run.dataset_fingerprint.as_deref().unwrap_or("(not recorded)"))),
        ("image root", esc(&r.dataset.image_root.display().to_string())),
        ("dataset splits", format!("train {tr}, val {va}, test {te}")),
        ("evaluated split", format!("{} ({} items)", r.split, r.items)),
        ("calibration split", format!("{} ({} items)", r.calibration_split, r.calibration_items)),
        (
            "thresholds",
            format!("precision &ge; {} with &ge; {} accepted validation items", r.target_precision, r.min_support),
        ),
        (
            "model",
            format!(
                "{} {}&times;{}, best epoch {} of {} (val mean macro-F1 {})",
                r.run.arch,
                r.run.config.input.width,
                r.run.config.input.height,
                r.run.best_epoch,
                r.run.epochs_done,
                num(r.run.best_val_macro_f1, 4)
            ),
        ),
        ("device", esc(&r.device)),
        ("generated", esc(r.generated_at.as_deref().unwrap_or("?"))),
    ];
    s.push_str("<table>\n");
    for (k, v) in kv {
        let _ = writeln!(s, "<tr><th class=\"l\">{k}</th><td class=\"l\">{v}</td></tr>");
    }
    s.push_str("</table>\n<nav>");
    for (h, e) in r.heads.iter().enumerate() {
        let _ = write!(s, "<a href=\"#head-{h}\">{}</a>", esc(&e.name));
    }
    s.push_str("<a href=\"#config\">run configuration</a></nav>\n");

    s.push_str("<h2>Summary</h2>\n<table><tr><th class=\"l\">head</th><th class=\"l\">kind</th><th>classes</th>\
        <th>labelled</th><th>accuracy %</th><th>macro-F1</th><th>micro-F1</th><th>weighted-F1</th><th>top-3 %</th>\
        <th>top-5 %</th><th>ECE before</th><th>ECE after</th><th>T</th><th>coverage %</th><th>accuracy at thr. %</th></tr>\n");
    for (h, e) in r.heads.iter().enumerate() {
        let m = &e.summary;
        let top = |k: usize| m.top_k.iter().find(|t| t.k == k).map(|t| t.accuracy);
        let _ = writeln!(
            s,
            "<tr><td class=\"l\"><a href=\"#head-{h}\">{}</a></td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
            esc(&e.name),
            if e.multi_label { "multi" } else { "single" },
            e.classes.len(),
            m.evaluated,
            pct(m.accuracy),
            num(m.macro_f1, 3),
            num(m.micro_f1, 3),
            num(m.weighted_f1, 3),
            pct(top(3)),
            pct(top(5)),
            num(m.ece_before, 3),
            num(m.ece_after, 3),
            m.temperature,
            pct(m.coverage),
            pct(m.accepted_accuracy),
        );
    }
    s.push_str(
        "</table>\n<p class=\"note\">Multi-label heads: F1 at the per-class thresholds, ECE over all known \
        item&times;class cells. Coverage: labelled items whose top class reaches its threshold.</p>\n",
    );

    for (h, e) in r.heads.iter().enumerate() {
        head_html(&mut s, h, e, r, out)?;
    }
    let config = serde_json::to_string_pretty(&r.run.config).unwrap_or_else(|e| format!("({e})"));
    let _ = write!(s, "<h2 id=\"config\">Run configuration</h2>\n<pre>{}</pre>\n</body></html>\n", esc(&config));
    Ok(s)
}

fn head_html(s: &mut String, h: usize, e: &HeadEval, r: &EvalReport, out: &Path) -> Result<(), ReportError> {
    use std::fmt::Write as _;
    let name = esc(&e.name);
    let _ = writeln!(
        s,
        "<h2 id=\"head-{h}\">{name} <small>({}-label, {} classes)</small></h2>",
        if e.multi_label { "multi" } else { "single" },
        e.classes.len()
    );
    let l = &e.labels;
    let _ = writeln!(
        s,
        "<p>{} split: {} labelled, {} missing, {} not applicable. Calibration: {} labelled validation items, \
         temperature {:.4}{}.</p>",
        r.split,
        l.labelled,
        l.missing,
        l.not_applicable,
        e.calibration_labelled,
        e.summary.temperature,
        e.temperature_fit
            .as_ref()
            .map(|f| format!(" (validation NLL {:.4} &rarr; {:.4})", f.nll_before, f.nll_after))
            .unwrap_or_default()
    );
    for n in &e.notes {
        let _ = writeln!(s, "<p class=\"note\">{}</p>", esc(n));
    }
    if let Some(m) = &e.single_label {
        let a = &m.report.averages;
        let _ = writeln!(
            s,
            "<table><tr><th></th><th>precision</th><th>recall</th><th>F1</th></tr>\
             <tr><th class=\"l\">macro ({} classes)</th><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>\
             <tr><th class=\"l\">micro</th><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>\
             <tr><th class=\"l\">weighted</th><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr></table>",
            a.macro_avg.classes,
            a.macro_avg.precision,
            a.macro_avg.recall,
            a.macro_avg.f1,
            a.micro_avg.precision,
            a.micro_avg.recall,
            a.micro_avg.f1,
            a.weighted_avg.precision,
            a.weighted_avg.recall,
            a.weighted_avg.f1
        );
        let ab = &m.abstention;
        let _ = writeln!(
            s,
            "<p>Accuracy {}% ({} items); {}. At the thresholds: coverage {}% ({} of {} items accepted), accuracy on \
             accepted items {}%.</p>",
            pct(e.summary.accuracy),
            m.report.evaluated,
            m.report
                .top_k
                .iter()
                .map(|t| format!("top-{} {}%", t.k, pct(Some(t.accuracy))))
                .collect::<Vec<_>>()
                .join(", "),
            pct(Some(ab.coverage)),
            ab.accepted,
            ab.evaluated,
            pct(ab.accepted_accuracy)
        );
        s.push_str(
            "<table><tr><th class=\"l\">class</th><th>support</th><th>predicted</th><th>precision</th><th>recall</th>\
             <th>F1</th><th>threshold</th><th>val precision at thr.</th><th>accepted</th><th>coverage %</th>\
             <th>precision at thr.</th></tr>\n",
        );
        for (c, class) in e.classes.iter().enumerate() {
            let pc = &m.report.per_class[c];
            let t = &e.thresholds.classes[c];
            let ac = &ab.per_class[c];
            let _ = writeln!(
                s,
                "<tr><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(class),
                pc.support,
                pc.predicted,
                pc.precision,
                pc.recall,
                pc.f1,
                if t.always_abstain { "abstain".to_string() } else { format!("{:.3}", t.threshold) },
                num(t.precision, 3),
                ac.accepted,
                pct(ac.coverage),
                num(ac.precision, 3)
            );
        }
        s.push_str("</table>\n");
    }
    if let Some(m) = &e.multi_label_metrics {
        let (t, f) = (&m.at_thresholds.averages, &m.at_half.averages);
        let _ = writeln!(
            s,
            "<table><tr><th></th><th>F1 at thresholds</th><th>F1 at 0.5</th></tr>\
             <tr><th class=\"l\">macro</th><td>{:.3}</td><td>{:.3}</td></tr>\
             <tr><th class=\"l\">micro</th><td>{:.3}</td><td>{:.3}</td></tr>\
             <tr><th class=\"l\">weighted</th><td>{:.3}</td><td>{:.3}</td></tr></table>",
            t.macro_avg.f1, f.macro_avg.f1, t.micro_avg.f1, f.micro_avg.f1, t.weighted_avg.f1, f.weighted_avg.f1
        );
        s.push_str(
            "<table><tr><th class=\"l\">class</th><th>known</th><th>positives</th><th>threshold</th><th>predicted</th>\
             <th>precision</th><th>recall</th><th>F1</th><th>precision at 0.5</th><th>recall at 0.5</th>\
             <th>F1 at 0.5</th></tr>\n",
        );
        for (c, class) in e.classes.iter().enumerate() {
            let (pt, ph) = (&m.at_thresholds.per_class[c], &m.at_half.per_class[c]);
            let t = &e.thresholds.classes[c];
            let _ = writeln!(
                s,
                "<tr><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td>\
                 <td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>",
                esc(class),
                pt.known,
                pt.metrics.support,
                if t.always_abstain { "abstain".to_string() } else { format!("{:.3}", t.threshold) },
                pt.metrics.predicted,
                pt.metrics.precision,
                pt.metrics.recall,
                pt.metrics.f1,
                ph.metrics.precision,
                ph.metrics.recall,
                ph.metrics.f1
            );
        }
        s.push_str("</table>\n");
    }
    if let Some(f) = &e.plots.confusion {
        let _ = writeln!(
            s,
            "<h3>Confusion matrix</h3>\n{}",
            embedded_png(out, f, &format!("{} confusion matrix", e.name))?
        );
    }
    if let Some(f) = &e.plots.reliability {
        let _ =
            writeln!(s, "<h3>Reliability</h3>\n{}", embedded_png(out, f, &format!("{} reliability diagram", e.name))?);
    }
    if let Some(f) = &e.plots.gradcam {
        let _ = writeln!(
            s,
            "<h3>Grad-CAM</h3>\n<p class=\"note\">Where the evidence for the predicted class was (red: most), on exactly \
             the pixels the network saw. Top row right predictions, bottom row wrong ones, in this order:</p>\n{}",
            embedded_png(out, f, &format!("{} Grad-CAM", e.name))?
        );
        s.push_str(
            "<table><tr><th class=\"l\">id</th><th class=\"l\">true</th><th class=\"l\">predicted</th>\
            <th>confidence</th><th class=\"l\">right</th></tr>\n",
        );
        for g in &e.gradcam {
            let _ = writeln!(
                s,
                "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{:.3}</td><td class=\"l\">{}</td></tr>",
                esc(&g.id),
                esc(&g.truth),
                esc(&g.predicted),
                g.confidence,
                if g.correct { "yes" } else { "no" }
            );
        }
        s.push_str("</table>\n");
    }
    Ok(())
}

/// A plain-text table of the headline numbers per head (what `trainer eval` prints).
pub fn summary_table(r: &EvalReport) -> String {
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"));
    let width = r.heads.iter().map(|e| e.name.chars().count()).max().unwrap_or(4).max(4);
    let mut lines = vec![format!(
        "{:<width$}  {:>6}  {:>6}  {:>7}  {:>7}  {:>6}  {:>6}  {:>6}  {:>7}  {:>6}  {:>7}",
        "head", "n", "acc", "macroF1", "microF1", "top3", "ECE", "ECE(T)", "T", "cover", "acc@thr"
    )];
    for e in &r.heads {
        let m = &e.summary;
        let top3 = m.top_k.iter().find(|t| t.k == 3).map(|t| t.accuracy);
        lines.push(format!(
            "{:<width$}  {:>6}  {:>6}  {:>7}  {:>7}  {:>6}  {:>6}  {:>6}  {:>7.3}  {:>6}  {:>7}",
            e.name,
            m.evaluated,
            opt(m.accuracy),
            opt(m.macro_f1),
            opt(m.micro_f1),
            opt(top3),
            opt(m.ece_before),
            opt(m.ece_after),
            m.temperature,
            opt(m.coverage),
            opt(m.accepted_accuracy),
        ));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn multi_label_thresholds_by_hand() {
        // Class 0, known cells sorted: 0.9 +, 0.8 +, 0.7 -, 0.6 +, 0.2 - (one masked cell at 0.95 -).
        // Target 2/3, min support 3: t = 0.7 gives 2/3 with 3 accepted; t = 0.6 gives 3/4: the smallest is 0.6.
        // Class 1: every known cell negative → abstain.
        let probs = array![[0.9f32, 0.1], [0.8, 0.9], [0.7, 0.2], [0.6, 0.3], [0.2, 0.4], [0.95, 0.5]];
        let (t, f) = (Some(true), Some(false));
        let targets = array![[t, f], [t, f], [f, f], [t, f], [f, f], [None, None]];
        let r = multi_label_thresholds(probs.view(), targets.view(), 2.0 / 3.0, 3);
        assert_eq!((r.classes[0].threshold, r.classes[0].accepted, r.classes[0].predicted), (0.6, 4, 5));
        assert_eq!(r.classes[0].precision, Some(0.75));
        assert!(r.classes[1].always_abstain && r.classes[1].threshold == 1.0);
        // Min support 5 needs every known cell: 3/5 < 2/3.
        let r = multi_label_thresholds(probs.view(), targets.view(), 2.0 / 3.0, 5);
        assert!(r.classes[0].always_abstain);
        // Applied the daemon's way (p >= t), the thresholds give what they promise.
        let r = multi_label_thresholds(probs.view(), targets.view(), 2.0 / 3.0, 3);
        let m = metrics::multi_label_report(probs.view(), targets.view(), &r.thresholds()).unwrap();
        assert_eq!(m.per_class[0].metrics.precision, 0.75);
    }

    #[test]
    fn confusion_plot_keeps_the_most_frequent_classes_and_normalises_rows() {
        let confusion = vec![vec![1, 1, 0], vec![0, 0, 0], vec![2, 0, 6]];
        assert_eq!(confusion_plot_classes(&confusion, 3), vec![0, 1, 2]);
        assert_eq!(confusion_plot_classes(&confusion, 2), vec![2, 0]);
        let m = normalised_confusion(&confusion, &[2, 0]);
        // Rows 2 and 0 over columns 2, 0 and the hidden class 1.
        assert_eq!(m, vec![vec![0.75, 0.25, 0.0], vec![0.0, 0.5, 0.5]]);
        let full = normalised_confusion(&confusion, &[0, 1, 2]);
        assert!(full[1].iter().all(|v| v.is_nan()));
        assert_eq!(full[2], vec![0.25, 0.0, 0.75]);
    }

    #[test]
    fn binary_reliability_counts_known_cells() {
        let probs = array![[0.9f32, 0.2], [0.6, 0.5]];
        let targets = array![[Some(true), Some(false)], [Some(false), None]];
        let r = binary_reliability(probs.view(), targets.view(), 10).unwrap();
        // Cells: 0.9 + (conf 0.9 right), 0.2 - (conf 0.8 right), 0.6 - (conf 0.6 wrong).
        assert_eq!(r.items, 3);
        assert!((r.accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.mean_confidence - (0.9 + 0.8 + 0.6) / 3.0).abs() < 1e-6);
    }

    #[test]
    fn html_escapes_and_file_stems_are_safe() {
        assert_eq!(esc("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&#39;");
        assert_eq!(file_stem(3, "base Colour/x"), "03_base_Colour_x");
        assert_eq!(fit_caption("short"), "short");
        assert_eq!(fit_caption(&"x".repeat(40)).chars().count(), 28);
    }

    #[test]
    fn grid_draws_captions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.png");
        let tile = RgbImage::from_pixel(64, 64, image::Rgb([200, 30, 30]));
        let rows = vec![
            ("right".to_string(), vec![(tile.clone(), ["true: a".to_string(), "pred: a 0.91".to_string()])]),
            ("wrong".to_string(), vec![]),
        ];
        draw_grid("t", rows, &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.width(), 10 + 192 + 10);
        // The tile is scaled to 192 px and the captions put dark pixels under it.
        let red = img.pixels().filter(|p| p.0 == [200, 30, 30]).count();
        assert!(red > 180 * 180, "{red} tile pixels");
        let dark = img.pixels().filter(|p| p.0[0] < 60 && p.0[1] < 60 && p.0[2] < 60).count();
        assert!(dark > 50, "{dark} text pixels");
    }
}
