//! The training loop: multi-head EfficientNet fine-tuning with masked losses, repeat-factor sampling, AdamW with
//! warm-up and cosine decay, gradient clipping, optional EMA, mixed precision and channels-last on CUDA,
//! per-epoch checkpoints, `--resume` and early stopping on validation macro-F1.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use attrd::preprocess::Preprocessor;
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

use super::{EffNet, GROUP_BACKBONE_DECAY, GROUP_BACKBONE_NO_DECAY, GROUP_HEAD_DECAY, GROUP_HEAD_NO_DECAY};
use crate::effnet::{Arch, Padding};
use crate::eval::metrics;
use crate::eval::sampling::{self, ClassWeightOptions, HeadLabels, RepeatFactorSampler};
use crate::train::TrainConfig;
use crate::train::data::{self, Augmenter, Batch, Example, HeadSpec, HeadTargets, Target};
use crate::train::schedule::Schedule;

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// Configuration or data problem.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// The model could not be built, loaded or run.
    #[error(transparent)]
    Torch(#[from] super::TorchError),
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Tch(#[from] tch::TchError),
    /// Metrics could not be computed.
    #[error("metrics")]
    Eval(#[from] crate::eval::EvalError),
    /// A file of the run directory could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--resume` found nothing usable.
    #[error("cannot resume from {dir}: {reason}")]
    Resume {
        /// The run directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// The loss became NaN or infinite for too many steps in a row.
    #[error("training diverged: the loss was not finite for {0} steps in a row (lower lr?)")]
    Diverged(usize),
}

/// File names inside a run directory.
pub const RUN_FILE: &str = "run.json";
/// Weights after the latest epoch (for `--resume`).
pub const LAST_WEIGHTS: &str = "last.safetensors";
/// Weights of the best validation epoch (what `eval` and `export` use).
pub const BEST_WEIGHTS: &str = "best.safetensors";
/// Per-epoch metrics.
pub const METRICS_CSV: &str = "metrics.csv";

/// Everything needed to rebuild the trained model and to continue the run; `run.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    /// The configuration the run was started with.
    pub config: TrainConfig,
    /// The heads, in model output order.
    pub heads: Vec<HeadSpec>,
    /// Architecture, padding convention and batch-norm epsilon of the backbone.
    pub arch: Arch,
    pub padding: Padding,
    pub bn_eps: f64,
    /// Fingerprint of the dataset manifest trained on, when known.
    pub dataset_fingerprint: Option<String>,
    /// Epochs completed.
    pub epochs_done: usize,
    /// Optimiser steps taken.
    pub steps_done: usize,
    /// Best mean validation macro-F1 so far and its epoch (1-based).
    pub best_val_f1: f64,
    pub best_epoch: usize,
    /// Epochs since the best one (early stopping).
    pub stale_epochs: usize,
    /// Loss scale of mixed precision at the end of the last epoch.
    pub loss_scale: f64,
    /// One record per completed epoch.
    pub log: Vec<EpochLog>,
}

/// One epoch's numbers (also a row of `metrics.csv`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub lr_end: f64,
    pub train_loss: f64,
    /// Mean training loss per head.
    pub head_loss: Vec<f64>,
    /// Validation macro-F1 per head.
    pub val_macro_f1: Vec<f64>,
    /// Validation accuracy per head (single-label) or micro-F1 (multi-label).
    pub val_accuracy: Vec<f64>,
    pub val_mean_macro_f1: f64,
    pub train_images_per_s: f64,
    pub seconds: f64,
    /// Steps skipped because the gradients were not finite.
    pub skipped_steps: usize,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct FitSummary {
    pub state: RunState,
    pub best_weights: PathBuf,
    pub stopped_early: bool,
}

/// Inputs of [`fit`].
pub struct FitInput<'a> {
    pub cfg: &'a TrainConfig,
    pub heads: &'a [HeadSpec],
    pub train: &'a [Example],
    pub val: &'a [Example],
    pub out_dir: &'a Path,
    /// Continue the run in `out_dir` from its last checkpoint.
    pub resume: bool,
    /// Canonical backbone to start from (already imported), or `None` for random initialisation.
    pub backbone: Option<&'a crate::weights::Backbone>,
    pub dataset_fingerprint: Option<String>,
    /// Show progress bars (off in tests).
    pub progress: bool,
}

/// The device named by `cfg.device`.
pub fn device(name: &str) -> Result<Device, FitError> {
    let bad = || crate::train::TrainError::Config(format!("device {name:?}: expected auto, cpu, cuda or cuda:N"));
    Ok(match name {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => Device::Cuda(other.strip_prefix("cuda:").and_then(|n| n.parse().ok()).ok_or_else(bad)?),
    })
}

/// The model of a run, built on `vs` (variables named as the canonical weights).
pub fn build_model(
    vs: &mut nn::VarStore,
    state: &RunState,
    backbone: Option<&crate::weights::Backbone>,
) -> Result<EffNet, FitError> {
    let specs: Vec<(String, usize)> = state.heads.iter().map(|h| (h.name.clone(), h.classes.len())).collect();
    let model = match backbone {
        Some(b) => EffNet::from_backbone(vs, b, &specs, state.config.dropout)?,
        None => EffNet::new(&vs.root(), state.arch, state.padding, state.bn_eps, &specs, state.config.dropout)?,
    };
    Ok(model.with_drop_path(state.config.drop_path)?)
}

/// Loads a finished run's model (weights from `best.safetensors`) for evaluation on `device`.
pub fn load_run(dir: &Path, device: Device) -> Result<(RunState, nn::VarStore, EffNet), FitError> {
    let state = read_state(dir)?;
    let mut vs = nn::VarStore::new(device);
    let model = build_model(&mut vs, &state, None)?;
    let path = dir.join(BEST_WEIGHTS);
    vs.load(&path).map_err(|e| FitError::Resume { dir: dir.to_owned(), reason: format!("{}: {e}", path.display()) })?;
    Ok((state, vs, model))
}

fn read_state(dir: &Path) -> Result<RunState, FitError> {
    let path = dir.join(RUN_FILE);
    let bytes = std::fs::read(&path).map_err(|source| FitError::Io { path: path.clone(), source })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| FitError::Resume { dir: dir.to_owned(), reason: format!("{RUN_FILE}: {e}") })
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FitError> {
    let io = |source| FitError::Io { path: path.to_owned(), source };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn save_weights(vs: &nn::VarStore, path: &Path) -> Result<(), FitError> {
    let tmp = path.with_extension("tmp.safetensors");
    // Channels-last weights are non-contiguous views, which safetensors cannot store: save contiguous copies.
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.contiguous())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&named, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|source| FitError::Io { path: path.to_owned(), source })
}

/// Trains, writing checkpoints, `run.json` and `metrics.csv` into `out_dir`.
pub fn fit(input: FitInput<'_>) -> Result<FitSummary, FitError> {
    let cfg = input.cfg;
    let names: Vec<String> = input.heads.iter().map(|h| h.name.clone()).collect();
    cfg.validate(&names)?;
    if input.train.is_empty() || input.val.is_empty() {
        return Err(crate::train::TrainError::Data(format!(
            "{} training and {} validation items; both must be non-empty",
            input.train.len(),
            input.val.len()
        ))
        .into());
    }
    let out = input.out_dir;
    std::fs::create_dir_all(out).map_err(|source| FitError::Io { path: out.to_owned(), source })?;
    let device = device(&cfg.device)?;
    let cuda = device.is_cuda();
    tch::manual_seed(cfg.seed as i64);

    let mut state = if input.resume {
        let s = read_state(out)?;
        if s.heads != input.heads {
            return Err(FitError::Resume {
                dir: out.to_owned(),
                reason: "the dataset's heads differ from the run's".into(),
            });
        }
        s
    } else {
        let (arch, padding, bn_eps) = match input.backbone {
            Some(b) => (b.arch, b.padding, f64::from(b.bn_eps)),
            None => (cfg.arch, cfg.arch.default_padding(), cfg.arch.default_bn_eps()),
        };
        RunState {
            config: cfg.clone(),
            heads: input.heads.to_vec(),
            arch,
            padding,
            bn_eps,
            dataset_fingerprint: input.dataset_fingerprint.clone(),
            epochs_done: 0,
            steps_done: 0,
            best_val_f1: f64::NEG_INFINITY,
            best_epoch: 0,
            stale_epochs: 0,
            loss_scale: INITIAL_LOSS_SCALE,
            log: Vec::new(),
        }
    };
    let mut vs = nn::VarStore::new(device);
    let model = build_model(&mut vs, &state, if input.resume { None } else { input.backbone })?;
    if input.resume {
        let p = out.join(LAST_WEIGHTS);
        vs.load(&p).map_err(|e| FitError::Resume { dir: out.to_owned(), reason: format!("{}: {e}", p.display()) })?;
        tracing::info!(epochs_done = state.epochs_done, "resuming (AdamW moments start afresh)");
    }
    if cuda && cfg.channels_last {
        to_channels_last(&vs);
    }
    let mut opt = nn::AdamW { wd: cfg.weight_decay, ..Default::default() }.build(&vs, cfg.lr)?;
    opt.set_weight_decay_group(GROUP_BACKBONE_NO_DECAY, 0.0);
    opt.set_weight_decay_group(GROUP_HEAD_NO_DECAY, 0.0);
    let mut ema = cfg.ema_decay.map(|d| Ema::new(&vs, d));

    let pre = data::preprocessor(cfg.input_spec())?;
    let aug = Augmenter::new(cfg.augment.clone());
    let sampler = epoch_sampler(cfg, input.heads, input.train)?;
    let class_weights = loss_class_weights(cfg, input.heads, input.train, device)?;
    let head_weights: Vec<f64> = names.iter().map(|n| cfg.head_weights.get(n).copied().unwrap_or(1.0)).collect();
    let steps_per_epoch = (sampler.expected_len() / cfg.batch_size as f64).ceil().max(1.0) as usize;
    let schedule = Schedule {
        peak: cfg.lr,
        warmup: ((cfg.warmup_epochs * steps_per_epoch as f64).round() as usize).max(1),
        total: steps_per_epoch * cfg.epochs,
        min_ratio: cfg.min_lr_ratio,
    };
    let amp = cuda && cfg.amp;
    let mut scaler = LossScaler::new(amp, state.loss_scale);
    let csv_path = out.join(METRICS_CSV);
    if !input.resume {
        let header = metrics_csv_header(&names);
        write_atomic(&csv_path, header.as_bytes())?;
    }
    tracing::info!(device = ?device, train = input.train.len(), val = input.val.len(), steps_per_epoch,
        heads = names.len(), amp, "training");

    let mut stopped_early = false;
    // (train, val) features of the frozen backbone, computed on the first frozen epoch that needs them.
    let mut cache: Option<(Tensor, Tensor)> = None;
    for epoch in state.epochs_done..cfg.epochs {
        let started = Instant::now();
        let frozen = epoch < cfg.freeze_backbone_epochs;
        if frozen && cfg.cache_frozen_features && cache.is_none() {
            let t0 = Instant::now();
            let cl = cuda && cfg.channels_last;
            let features_of = |items: &[Example], what: &str| {
                let bar = progress_bar(input.progress, items.len() as u64, what);
                let f = pooled_features(&model, items, input.heads, &pre, device, cfg.batch_size, cl, amp, |done| {
                    bar.set_position(done as u64)
                });
                bar.finish_and_clear();
                f
            };
            let train_f = features_of(input.train, "caching train features")?;
            let val_f = features_of(input.val, "caching val features")?;
            tracing::info!(
                items = input.train.len() + input.val.len(),
                seconds = t0.elapsed().as_secs(),
                "backbone features cached; the frozen epochs train the heads on them"
            );
            cache = Some((train_f, val_f));
        }
        let cached = if frozen { cache.as_ref() } else { None };
        let order = sampler.epoch(epoch as u64);
        let batches: Vec<Vec<usize>> = order.chunks(cfg.batch_size).map(<[usize]>::to_vec).collect();
        let bar = progress_bar(input.progress, batches.len() as u64, &format!("epoch {}/{}", epoch + 1, cfg.epochs));
        let (tx, rx) = mpsc::sync_channel::<Batch>(2);
        let (train, heads, pre_ref, aug_ref) = (input.train, input.heads, &pre, &aug);
        let seed = cfg.seed;
        let use_cache = cached.is_some();
        let mut sums = vec![0f64; names.len()];
        let mut counts = vec![0usize; names.len()];
        let (mut total_loss, mut total_n, mut skipped, mut bad_in_a_row) = (0f64, 0usize, 0usize, 0usize);
        let mut lr = 0.0;
        std::thread::scope(|scope| -> Result<(), FitError> {
            // Batches are prepared on the rayon pool while the previous one trains.
            scope.spawn(move || {
                for (b, idx) in batches.iter().enumerate() {
                    let bseed = seed ^ ((epoch as u64) << 32) ^ b as u64;
                    let batch = if use_cache {
                        Batch {
                            n: idx.len(),
                            images: Vec::new(),
                            targets: data::batch_targets(train, idx, heads),
                            indices: idx.clone(),
                        }
                    } else {
                        data::make_batch(train, idx, heads, pre_ref, Some((aug_ref, bseed)))
                    };
                    if tx.send(batch).is_err() {
                        return;
                    }
                }
            });
            for batch in rx {
                lr = schedule.lr(state.steps_done);
                opt.set_lr_group(GROUP_BACKBONE_DECAY, lr);
                opt.set_lr_group(GROUP_BACKBONE_NO_DECAY, lr);
                opt.set_lr_group(GROUP_HEAD_DECAY, lr * cfg.head_lr_mult);
                opt.set_lr_group(GROUP_HEAD_NO_DECAY, lr * cfg.head_lr_mult);
                let logits = tch::autocast(amp, || -> Result<Vec<Tensor>, FitError> {
                    if let Some((train_f, _)) = cached {
                        let idx: Vec<i64> = batch.indices.iter().map(|&i| i as i64).collect();
                        let rows = Tensor::from_slice(&idx).to_device(device);
                        return Ok(model.f_heads_from_features_t(&train_f.f_index_select(0, &rows)?, true)?);
                    }
                    let xs = images_tensor(&batch, &pre, device, cuda && cfg.channels_last);
                    if frozen {
                        let feats = tch::no_grad(|| model.f_features_t(&xs, false))?;
                        Ok(model.f_heads_from_features_t(&feats, true)?)
                    } else {
                        Ok(model.f_forward_heads_t(&xs, true)?)
                    }
                })?;
                let mut loss = Tensor::zeros([], (Kind::Float, device));
                for (h, (l, t)) in logits.iter().zip(&batch.targets).enumerate() {
                    let Some(hl) = head_loss(l, t, cfg.label_smoothing, class_weights[h].as_ref(), device)? else {
                        continue;
                    };
                    let v = hl.double_value(&[]);
                    if v.is_finite() {
                        sums[h] += v * t.known() as f64;
                        counts[h] += t.known();
                    }
                    loss += hl * head_weights[h];
                }
                let lv = loss.double_value(&[]);
                opt.zero_grad();
                (&loss * scaler.scale()).backward();
                if scaler.step(&mut opt, &vs, cfg.clip_grad_norm)? && lv.is_finite() {
                    bad_in_a_row = 0;
                    total_loss += lv * batch.n as f64;
                    total_n += batch.n;
                    if let Some(e) = ema.as_mut() {
                        e.update(&vs);
                    }
                } else {
                    skipped += 1;
                    bad_in_a_row += 1;
                    if bad_in_a_row >= 50 {
                        return Err(FitError::Diverged(bad_in_a_row));
                    }
                }
                state.steps_done += 1;
                bar.inc(1);
                bar.set_message(format!(
                    "loss {:.4} lr {lr:.2e}",
                    if total_n > 0 { total_loss / total_n as f64 } else { f64::NAN }
                ));
            }
            Ok(())
        })?;
        bar.finish_and_clear();
        let train_secs = started.elapsed().as_secs_f64();

        // Validation with the averaged weights when EMA is on.
        let swapped = ema.as_mut().map(|e| e.swap_in(&vs));
        let probs = match cached {
            Some((_, val_f)) => {
                let logits = tch::no_grad(|| model.f_heads_from_features_t(val_f, false))?;
                probabilities(input.heads, &logits_arrays(input.heads, input.val.len(), &logits)?)
            }
            None => {
                predict(&model, input.val, input.heads, &pre, device, cfg.batch_size, cuda && cfg.channels_last, amp)?
            }
        };
        let (f1s, accs) = head_scores(input.heads, input.val, &probs)?;
        let mean_f1 = f1s.iter().sum::<f64>() / f1s.len().max(1) as f64;
        let improved = mean_f1 > state.best_val_f1;
        if improved {
            save_weights(&vs, &out.join(BEST_WEIGHTS))?;
        }
        if let (Some(e), Some(backup)) = (ema.as_mut(), swapped) {
            e.swap_out(&vs, backup);
        }
        save_weights(&vs, &out.join(LAST_WEIGHTS))?;
        let log = EpochLog {
            epoch: epoch + 1,
            lr_end: lr,
            train_loss: if total_n > 0 { total_loss / total_n as f64 } else { f64::NAN },
            head_loss: sums.iter().zip(&counts).map(|(s, &c)| if c > 0 { s / c as f64 } else { f64::NAN }).collect(),
            val_macro_f1: f1s,
            val_accuracy: accs,
            val_mean_macro_f1: mean_f1,
            train_images_per_s: total_n as f64 / train_secs,
            seconds: started.elapsed().as_secs_f64(),
            skipped_steps: skipped,
        };
        append_csv(&csv_path, &log)?;
        tracing::info!(
            epoch = log.epoch,
            train_loss = log.train_loss,
            val_mean_macro_f1 = mean_f1,
            images_per_s = log.train_images_per_s as u64,
            seconds = log.seconds as u64,
            improved,
            "epoch done"
        );
        if improved {
            state.best_val_f1 = mean_f1;
            state.best_epoch = epoch + 1;
            state.stale_epochs = 0;
        } else {
            state.stale_epochs += 1;
        }
        state.epochs_done = epoch + 1;
        state.loss_scale = scaler.scale();
        state.log.push(log);
        let json = serde_json::to_vec_pretty(&state)
            .map_err(|e| FitError::Resume { dir: out.to_owned(), reason: e.to_string() })?;
        write_atomic(&out.join(RUN_FILE), &json)?;
        if cfg.early_stopping_patience > 0 && state.stale_epochs >= cfg.early_stopping_patience {
            tracing::info!(best_epoch = state.best_epoch, "early stopping: validation macro-F1 stopped improving");
            stopped_early = true;
            break;
        }
    }
    Ok(FitSummary { best_weights: out.join(BEST_WEIGHTS), state, stopped_early })
}

fn progress_bar(show: bool, len: u64, prefix: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(prefix.to_owned());
    bar
}

/// Repeat-factor sampling over the training items (plain shuffling when the threshold is 0).
fn epoch_sampler(cfg: &TrainConfig, heads: &[HeadSpec], train: &[Example]) -> Result<RepeatFactorSampler, FitError> {
    let factors = if cfg.repeat_factor_threshold > 0.0 {
        let labels: Vec<Vec<Option<usize>>> =
            (0..heads.len()).map(|h| train.iter().map(|e| e.targets[h].class()).collect()).collect();
        let hl: Vec<HeadLabels<'_>> = heads
            .iter()
            .zip(&labels)
            .filter(|(s, _)| !s.multi_label)
            .map(|(s, l)| HeadLabels { labels: l, classes: s.classes.len() })
            .collect();
        if hl.is_empty() {
            vec![1.0; train.len()]
        } else {
            sampling::repeat_factors(&hl, cfg.repeat_factor_threshold)?.per_item
        }
    } else {
        vec![1.0; train.len()]
    };
    Ok(RepeatFactorSampler::new(factors, cfg.seed)?)
}

fn loss_class_weights(
    cfg: &TrainConfig,
    heads: &[HeadSpec],
    train: &[Example],
    device: Device,
) -> Result<Vec<Option<Tensor>>, FitError> {
    heads
        .iter()
        .enumerate()
        .map(|(h, spec)| {
            if !cfg.class_weighted_loss || spec.multi_label {
                return Ok(None);
            }
            let labels: Vec<Option<usize>> = train.iter().map(|e| e.targets[h].class()).collect();
            let w = sampling::class_weights(
                &labels,
                spec.classes.len(),
                &ClassWeightOptions { power: 1.0, min: 0.1, max: 10.0 },
            )?;
            Ok(Some(Tensor::from_slice(&w).to_device(device)))
        })
        .collect()
}

/// A head's mean loss over its known labels (unknown ones are masked out); `None` when the batch has none (a mean
/// over nothing would be NaN).
pub fn head_loss(
    logits: &Tensor,
    targets: &HeadTargets,
    smoothing: f64,
    weight: Option<&Tensor>,
    device: Device,
) -> Result<Option<Tensor>, FitError> {
    if targets.known() == 0 {
        return Ok(None);
    }
    let logits = logits.to_kind(Kind::Float);
    Ok(Some(match targets {
        HeadTargets::Single(t) => {
            let t = Tensor::from_slice(t).to_device(device);
            logits.f_cross_entropy_loss(&t, weight, Reduction::Mean, data::IGNORE, smoothing)?
        }
        HeadTargets::Multi { targets, mask, classes } => {
            let n = (targets.len() / classes) as i64;
            let shape = [n, *classes as i64];
            let t = Tensor::from_slice(targets).reshape(shape).to_device(device);
            let m = Tensor::from_slice(mask).reshape(shape).to_device(device);
            let sum = logits.f_binary_cross_entropy_with_logits(&t, Some(&m), None::<&Tensor>, Reduction::Sum)?;
            sum / m.sum(Kind::Float)
        }
    }))
}

fn images_tensor(batch: &Batch, pre: &Preprocessor, device: Device, channels_last: bool) -> Tensor {
    let s = pre.spec();
    let xs = Tensor::from_slice(&batch.images).reshape([batch.n as i64, 3, i64::from(s.height), i64::from(s.width)]);
    let xs = xs.to_device(device);
    if channels_last { as_channels_last(&xs) } else { xs }
}

/// The same NCHW tensor with NHWC strides, which is how PyTorch marks channels-last memory format.
pub fn as_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Every 4-d variable (the convolution weights) of `vs` in channels-last memory format.
pub fn to_channels_last(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            if v.dim() == 4 {
                let cl = as_channels_last(&v);
                v.set_data(&cl);
            }
        }
    });
}

/// The fp16 loss scale a new run starts at (PyTorch's GradScaler default).
pub const INITIAL_LOSS_SCALE: f64 = 65536.0;

/// Dynamic loss scaling for fp16 (what PyTorch's GradScaler does): gradients are unscaled before clipping, a step
/// with non-finite gradients is skipped and halves the scale, 2000 good steps double it. Without AMP the scale stays
/// 1 and only the non-finite check remains.
pub struct LossScaler {
    scale: f64,
    good: usize,
    enabled: bool,
}

impl LossScaler {
    /// Starts at `initial` (a resumed run's saved scale) with AMP, at 1 and never rescaling without it.
    pub fn new(amp: bool, initial: f64) -> Self {
        Self { scale: if amp { initial } else { 1.0 }, good: 0, enabled: amp }
    }

    /// What the loss is multiplied by before `backward`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Unscales, checks, clips and steps; false when the step was skipped.
    pub fn step(&mut self, opt: &mut nn::Optimizer, vs: &nn::VarStore, clip: f64) -> Result<bool, FitError> {
        let vars = vs.trainable_variables();
        let mut grads: Vec<Tensor> = vars.iter().map(Tensor::grad).filter(Tensor::defined).collect();
        let norm = tch::no_grad(|| -> Result<f64, FitError> {
            if self.enabled {
                for g in &mut grads {
                    let _ = g.f_div_scalar_(self.scale)?;
                }
            }
            let sq: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float)).collect();
            Ok(if sq.is_empty() { 0.0 } else { Tensor::stack(&sq, 0).sum(Kind::Float).sqrt().double_value(&[]) })
        })?;
        if !norm.is_finite() {
            if self.enabled {
                self.scale = (self.scale / 2.0).max(1.0);
                self.good = 0;
            }
            opt.zero_grad();
            return Ok(false);
        }
        if clip > 0.0 && norm > clip {
            let k = clip / (norm + 1e-6);
            tch::no_grad(|| -> Result<(), FitError> {
                for g in &mut grads {
                    let _ = g.f_mul_scalar_(k)?;
                }
                Ok(())
            })?;
        }
        opt.step();
        if self.enabled {
            self.good += 1;
            if self.good.is_multiple_of(2000) {
                self.scale = (self.scale * 2.0).min(2f64.powi(24));
            }
        }
        Ok(true)
    }
}

/// Exponential moving average of every floating-point variable (batch-norm statistics included).
struct Ema {
    decay: f64,
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    fn new(vs: &nn::VarStore, decay: f64) -> Self {
        let mut shadow: Vec<(String, Tensor)> =
            vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
        shadow.sort_by(|a, b| a.0.cmp(&b.0));
        Self { decay, shadow }
    }

    fn update(&mut self, vs: &nn::VarStore) {
        let vars = vs.variables();
        tch::no_grad(|| {
            for (name, s) in &mut self.shadow {
                if let Some(v) = vars.get(name) {
                    let _ = s.f_mul_scalar_(self.decay).and_then(|mut s| s.f_add_(&(v.detach() * (1.0 - self.decay))));
                }
            }
        });
    }

    /// Puts the averaged weights into `vs`, returning the live ones.
    fn swap_in(&mut self, vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let vars = vs.variables();
        tch::no_grad(|| {
            self.shadow
                .iter()
                .filter_map(|(name, s)| {
                    let mut v = vars.get(name)?.shallow_clone();
                    let live = v.detach().copy();
                    v.copy_(s);
                    Some((name.clone(), live))
                })
                .collect()
        })
    }

    fn swap_out(&mut self, vs: &nn::VarStore, live: Vec<(String, Tensor)>) {
        let vars = vs.variables();
        tch::no_grad(|| {
            for (name, t) in live {
                if let Some(v) = vars.get(&name) {
                    v.shallow_clone().copy_(&t);
                }
            }
        });
    }
}

/// Probabilities per head (`[N, classes]`, softmax or sigmoid at temperature 1) for `examples`; see
/// [`predict_logits`].
#[allow(clippy::too_many_arguments)]
pub fn predict(
    model: &EffNet,
    examples: &[Example],
    heads: &[HeadSpec],
    pre: &Preprocessor,
    device: Device,
    batch_size: usize,
    channels_last: bool,
    amp: bool,
) -> Result<Vec<Array2<f32>>, FitError> {
    let logits = predict_logits(model, examples, heads, pre, device, batch_size, channels_last, amp)?;
    Ok(probabilities(heads, &logits))
}

/// Softmax (single-label) or sigmoid (multi-label) of each head's logits.
pub fn probabilities(heads: &[HeadSpec], logits: &[Array2<f32>]) -> Vec<Array2<f32>> {
    heads
        .iter()
        .zip(logits)
        .map(|(spec, l)| {
            if spec.multi_label {
                l.mapv(|v| 1.0 / (1.0 + (-v).exp()))
            } else {
                let mut p = l.clone();
                for mut row in p.outer_iter_mut() {
                    let m = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    row.mapv_inplace(|v| (v - m).exp());
                    let s = row.sum();
                    row.mapv_inplace(|v| v / s);
                }
                p
            }
        })
        .collect()
}

/// Logits per head (`[N, classes]`) for `examples`, without augmentation: the input tensors are exactly what
/// serving computes for the same decoded images.
#[allow(clippy::too_many_arguments)]
pub fn predict_logits(
    model: &EffNet,
    examples: &[Example],
    heads: &[HeadSpec],
    pre: &Preprocessor,
    device: Device,
    batch_size: usize,
    channels_last: bool,
    amp: bool,
) -> Result<Vec<Array2<f32>>, FitError> {
    if examples.is_empty() {
        return Ok(heads.iter().map(|h| Array2::zeros((0, h.classes.len()))).collect());
    }
    let mut parts: Vec<Vec<Tensor>> = heads.iter().map(|_| Vec::new()).collect();
    let idx: Vec<usize> = (0..examples.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let batch = data::make_batch(examples, chunk, heads, pre, None);
        let xs = images_tensor(&batch, pre, device, channels_last);
        let logits = tch::no_grad(|| tch::autocast(amp, || model.f_forward_heads_t(&xs, false)))?;
        for (h, l) in logits.into_iter().enumerate() {
            parts[h].push(l.to_kind(Kind::Float).to_device(Device::Cpu));
        }
    }
    let logits = parts.iter().map(|p| Tensor::f_cat(p, 0)).collect::<Result<Vec<_>, _>>()?;
    logits_arrays(heads, examples.len(), &logits)
}

/// Pooled backbone features (`[N, C]` float, on `device`) of `examples` without augmentation, in inference mode;
/// `progress` gets the number of items done after each batch.
#[allow(clippy::too_many_arguments)]
pub fn pooled_features(
    model: &EffNet,
    examples: &[Example],
    heads: &[HeadSpec],
    pre: &Preprocessor,
    device: Device,
    batch_size: usize,
    channels_last: bool,
    amp: bool,
    progress: impl Fn(usize),
) -> Result<Tensor, FitError> {
    if examples.is_empty() {
        return Ok(Tensor::zeros([0, crate::effnet::FEATURE_DIM as i64], (Kind::Float, device)));
    }
    let idx: Vec<usize> = (0..examples.len()).collect();
    let mut parts = Vec::new();
    for chunk in idx.chunks(batch_size.max(1)) {
        let batch = data::make_batch(examples, chunk, heads, pre, None);
        let xs = images_tensor(&batch, pre, device, channels_last);
        let f = tch::no_grad(|| tch::autocast(amp, || model.f_features_t(&xs, false)))?;
        parts.push(f.to_kind(Kind::Float));
        progress(chunk[chunk.len() - 1] + 1);
    }
    Ok(Tensor::f_cat(&parts, 0)?)
}

/// Copies per-head `[n, classes]` logit tensors to host arrays.
fn logits_arrays(heads: &[HeadSpec], n: usize, logits: &[Tensor]) -> Result<Vec<Array2<f32>>, FitError> {
    heads
        .iter()
        .zip(logits)
        .map(|(spec, l)| {
            let l = l.to_kind(Kind::Float).to_device(Device::Cpu).contiguous().view([-1]);
            Array2::from_shape_vec((n, spec.classes.len()), Vec::<f32>::try_from(&l)?)
                .map_err(|e| FitError::Tch(tch::TchError::Shape(e.to_string())))
        })
        .collect()
}

/// Macro-F1 and accuracy (micro-F1 for multi-label heads at 0.5) per head on examples with known labels.
pub fn head_scores(
    heads: &[HeadSpec],
    examples: &[Example],
    probs: &[Array2<f32>],
) -> Result<(Vec<f64>, Vec<f64>), FitError> {
    let mut f1s = Vec::new();
    let mut accs = Vec::new();
    for (h, spec) in heads.iter().enumerate() {
        if spec.multi_label {
            let c = spec.classes.len();
            let targets = Array2::from_shape_fn((examples.len(), c), |(i, k)| match &examples[i].targets[h] {
                Target::Multi(on) => Some(on.contains(&k)),
                _ => None,
            });
            let r = metrics::multi_label_report(probs[h].view(), targets.view(), &vec![0.5; c])?;
            f1s.push(r.averages.macro_avg.f1);
            accs.push(r.averages.micro_avg.f1);
        } else {
            let labels: Vec<Option<usize>> = examples.iter().map(|e| e.targets[h].class()).collect();
            if labels.iter().all(Option::is_none) {
                f1s.push(0.0);
                accs.push(0.0);
                continue;
            }
            let r = metrics::single_label_report(probs[h].view(), &labels, &[])?;
            f1s.push(r.averages.macro_avg.f1);
            accs.push(r.accuracy);
        }
    }
    Ok((f1s, accs))
}

fn metrics_csv_header(names: &[String]) -> String {
    let mut cols =
        vec!["epoch", "lr_end", "train_loss", "val_mean_macro_f1", "train_images_per_s", "seconds", "skipped_steps"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
    for n in names {
        cols.push(format!("loss_{n}"));
        cols.push(format!("val_macro_f1_{n}"));
        cols.push(format!("val_accuracy_{n}"));
    }
    cols.join(",") + "\n"
}

fn append_csv(path: &Path, log: &EpochLog) -> Result<(), FitError> {
    let mut row = vec![
        log.epoch.to_string(),
        format!("{:.6e}", log.lr_end),
        format!("{:.6}", log.train_loss),
        format!("{:.6}", log.val_mean_macro_f1),
        format!("{:.1}", log.train_images_per_s),
        format!("{:.1}", log.seconds),
        log.skipped_steps.to_string(),
    ];
    for h in 0..log.head_loss.len() {
        row.push(format!("{:.6}", log.head_loss[h]));
        row.push(format!("{:.6}", log.val_macro_f1[h]));
        row.push(format!("{:.6}", log.val_accuracy[h]));
    }
    let io = |source| FitError::Io { path: path.to_owned(), source };
    let mut f = std::fs::OpenOptions::new().append(true).open(path).map_err(io)?;
    writeln!(f, "{}", row.join(",")).map_err(io)
}
