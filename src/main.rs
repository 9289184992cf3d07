//! `attrd`: the edge daemon and its command-line tools.

use anyhow::{Context, Result, bail};
use attrd::bundle::{Bundle, SignatureStatus, TrustedKeys};
use attrd::engine::{Engine, EngineConfig, Provider};
use attrd::models::{ModelStore, SelfTestReport};
use attrd::preprocess::{Limits, Preprocessor};
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "attrd", version, about = "Product-image attribute extraction at the edge")]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `attrd=debug`.
    #[arg(long, global = true, env = "ATTRD_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: capture, infer, publish (what the systemd unit starts).
    Run {
        /// Configuration file (`conf.d/*.toml` beside it and `ATTRD__…` variables are layered on top).
        #[arg(long, default_value = attrd::config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run a bundle on image files and print one JSON object per image.
    Infer(InferArgs),
    /// Inspect and check model bundles.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Measure the daemon's path end to end on a directory of photos: decode, infer, store in the outbox, publish
    /// to a broker and wait for its acknowledgements. Prints images/s and per-stage latency (p50/p99).
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Bundle directory.
    #[arg(long)]
    bundle: PathBuf,
    /// Public keys (PEM) trusted to sign bundles; the signature is checked when at least one is given.
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<PathBuf>,
    /// Directory of photos (JPEG, PNG, WebP); every file in it is used, in name order.
    #[arg(long)]
    images: PathBuf,
    /// Use at most this many photos.
    #[arg(long)]
    limit: Option<usize>,
    /// Execution providers to try, in order.
    #[arg(long, value_delimiter = ',', default_value = "cpu")]
    providers: Vec<Provider>,
    /// ONNX Runtime intra-op threads per session (0 = ORT's default, or the cores divided among the sessions).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Sessions running batches side by side (`engine.sessions`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    sessions: u16,
    /// Most images per inference call (the pipeline's `max_batch`).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    batch: u16,
    /// Whether ORT's intra-op threads spin between operators (`engine.intra_spinning`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    spin: bool,
    /// Photos decoded at once (the pipeline's `decode_workers`; default one per CPU core).
    #[arg(long)]
    decode_workers: Option<usize>,
    /// MQTT broker host.
    #[arg(long, default_value = "127.0.0.1")]
    mqtt_host: String,
    /// MQTT broker port.
    #[arg(long, default_value_t = 1883)]
    mqtt_port: u16,
    /// Node name in the result topics (`attrd/<node>/results/<sku>`).
    #[arg(long, default_value = "bench")]
    node: String,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load and validate a configuration without touching the network; prints the effective settings.
    Check {
        #[arg(long, default_value = attrd::config::DEFAULT_PATH)]
        config: PathBuf,
    },
}

#[derive(clap::Args)]
struct InferArgs {
    /// Bundle directory.
    #[arg(long)]
    bundle: PathBuf,
    /// Execution providers to try, in order (comma-separated: cuda, tensorrt, cpu).
    #[arg(long, value_delimiter = ',', default_value = "cuda,tensorrt,cpu")]
    providers: Vec<Provider>,
    /// Public keys (PEM) trusted to sign bundles; the signature is checked when at least one is given.
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<PathBuf>,
    /// Images per inference batch.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    batch: u16,
    /// ONNX Runtime intra-op threads (0 = ORT's default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Allow TF32 math on the CUDA provider (faster; about 1e-3 relative difference from fp32).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    cuda_tf32: bool,
    /// Run a bundle whose INT8 weights saturate this CPU's integer kernels instead of refusing it (diagnosis only:
    /// `scripts/check-int8-portability` uses it to show what such a CPU would compute).
    #[arg(long)]
    allow_saturating_int8: bool,
    /// Image files (JPEG, PNG, WebP).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

/// Where the node keeps its models, whom it trusts, and how it runs them.
#[derive(clap::Args, Clone)]
struct StoreArgs {
    /// The daemon's configuration file: the models directory, trusted keys and engine settings (ONNX Runtime library,
    /// providers, device, INT8 and TensorRT options) come from it, so a self-test here runs as the service's will.
    /// Without it, the flags below apply.
    #[arg(long, conflicts_with_all = ["models_dir", "trusted_keys", "providers"])]
    config: Option<PathBuf>,
    /// The node's models directory.
    #[arg(long, env = "ATTRD_MODELS_DIR", default_value = "/var/lib/attrd/models")]
    models_dir: PathBuf,
    /// Public keys (PEM) trusted to sign bundles.
    #[arg(long = "trusted-key", required_unless_present = "config")]
    trusted_keys: Vec<PathBuf>,
    /// Execution providers to self-test on, in order.
    #[arg(long, value_delimiter = ',', default_value = "cuda,tensorrt,cpu")]
    providers: Vec<Provider>,
}

impl StoreArgs {
    /// The store and the engine settings activations self-test with.
    fn open(&self) -> Result<(ModelStore, EngineConfig)> {
        let (dir, keys, engine) = match &self.config {
            Some(path) => {
                let cfg = attrd::config::Config::load(path).with_context(|| format!("loading {}", path.display()))?;
                // As the daemon activates: the slow providers it builds in the background are not waited for.
                (cfg.models.dir.clone(), cfg.models.trusted_keys.clone(), cfg.engine.foreground())
            }
            None => (
                self.models_dir.clone(),
                self.trusted_keys.clone(),
                EngineConfig { providers: self.providers.clone(), ..EngineConfig::default() },
            ),
        };
        let keys = TrustedKeys::from_files(&keys).context("loading trusted keys")?;
        let store = ModelStore::open(&dir, keys, false)
            .with_context(|| format!("opening models directory {}", dir.display()))?;
        Ok((store, engine))
    }
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Install a bundle (directory or .tar) into the models directory after checking hashes and signature.
    Install {
        /// Bundle directory or archive.
        source: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
        /// Activate it right away (after its self-test passes).
        #[arg(long)]
        activate: bool,
    },
    /// List installed bundles.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Self-test an installed bundle on the configured providers and make it the active model.
    Activate {
        /// Installed bundle id, `<name>-<version>` (see `list`).
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Re-activate the previously active bundle.
    Rollback {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Run a bundle's self-test (its golden set on the first provider that loads) on this machine without installing
    /// it; exits non-zero, naming the image and attribute, when the machine does not reproduce it.
    Test {
        /// Bundle directory.
        bundle: PathBuf,
        /// Public keys (PEM) trusted to sign bundles.
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<PathBuf>,
        /// Accept a bundle without checking its signature (development only).
        #[arg(long)]
        allow_unsigned: bool,
        /// Execution providers to try, in order.
        #[arg(long, value_delimiter = ',', default_value = "cuda,tensorrt,cpu")]
        providers: Vec<Provider>,
        /// Self-test a bundle whose INT8 weights saturate this CPU's integer kernels instead of refusing to load it
        /// (diagnosis: shows what its golden set says about this CPU).
        #[arg(long)]
        allow_saturating_int8: bool,
    },
    /// Open a bundle, check its files against the manifest's hashes and its signature against trusted keys.
    Verify {
        /// Bundle directory.
        bundle: PathBuf,
        /// Public keys (PEM) trusted to sign bundles.
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<PathBuf>,
        /// Accept a bundle without checking its signature (development only).
        #[arg(long)]
        allow_unsigned: bool,
    },
}

mod daemon;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Run { config } = &cli.command {
        return run_daemon(config.clone());
    }
    if let Err(e) = init_logging(&cli.log, attrd::config::LogFormat::Text) {
        eprintln!("attrd: error: --log / ATTRD_LOG: {e}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("attrd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sets the log filter of a running daemon (SIGHUP applies `log.filter` through it).
pub(crate) type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Fails only on a bad filter: `log.filter` is checked with the configuration, so that means `ATTRD_LOG`.
fn init_logging(filter: &str, format: attrd::config::LogFormat) -> Result<SetLogFilter, String> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("log filter {filter:?}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        attrd::config::LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stderr)).init(),
        attrd::config::LogFormat::Json => registry.with(fmt::layer().json().with_writer(std::io::stderr)).init(),
    }
    Ok(Box::new(move |f: &str| {
        let new = EnvFilter::try_new(f).map_err(|e| format!("log filter {f:?}: {e}"))?;
        handle.reload(new).map_err(|e| e.to_string())
    }))
}

fn run_daemon(config: PathBuf) -> ExitCode {
    let cfg = match attrd::config::Config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("attrd: error: {}: {e:#}", config.display());
            return ExitCode::FAILURE;
        }
    };
    let filter = std::env::var("ATTRD_LOG").unwrap_or_else(|_| cfg.log.filter.clone());
    let set_filter = match init_logging(&filter, cfg.log.format) {
        Ok(s) => s,
        Err(e) => {
            let from = if std::env::var_os("ATTRD_LOG").is_some() { "ATTRD_LOG" } else { "log.filter" };
            eprintln!("attrd: error: {from}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("attrd").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("attrd: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(daemon::run(config, cfg, set_filter)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "attrd failed");
            eprintln!("attrd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run { .. } => unreachable!("handled in main"),
        Command::Config(ConfigCommand::Check { config }) => {
            let cfg = attrd::config::Config::load(&config)?;
            println!("{}: ok", config.display());
            println!("{cfg:#?}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Infer(args) => infer(args),
        Command::Bench(args) => bench(args),
        Command::Model(ModelCommand::Verify { bundle, trusted_keys, allow_unsigned }) => {
            let b = open_bundle(&bundle, &trusted_keys, allow_unsigned)?;
            let m = b.manifest();
            println!(
                "{}: ok ({} {}, {} heads, onnx sha256 {})",
                b.label(),
                m.architecture,
                m.precision.as_str(),
                m.heads.len(),
                b.onnx_sha256()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Test {
            bundle,
            trusted_keys,
            allow_unsigned,
            providers,
            allow_saturating_int8,
        }) => {
            let b = open_bundle(&bundle, &trusted_keys, allow_unsigned)?;
            let cfg = EngineConfig { providers, allow_saturating_int8, ..EngineConfig::default() };
            let (_, report) = attrd::models::load_and_test(&b, &cfg)?;
            print_self_test(&format!("{}: self-test", b.label()), &report);
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Install { source, store, activate }) => {
            let (s, engine) = store.open()?;
            let b = s.install(&source).with_context(|| format!("installing {}", source.display()))?;
            println!("installed {} in {}", b.label(), b.dir().display());
            if activate {
                let id = b.dir().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let (_, report) = s.activate(&id, &engine)?;
                print_activation(&b.label(), &report);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::List { store }) => {
            for i in store.open()?.0.list()? {
                println!(
                    "{} {:<32} {:<5} signed by {}",
                    if i.active { "*" } else { " " },
                    i.id,
                    i.precision,
                    i.signed_by.as_deref().unwrap_or("(unverified)")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Activate { id, store }) => {
            let (s, engine) = store.open()?;
            let (_, report) = s.activate(&id, &engine)?;
            print_activation(&id, &report);
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Rollback { store }) => {
            let (s, engine) = store.open()?;
            let (id, _, report) = s.rollback(&engine)?;
            print_activation(&id, &report);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_activation(what: &str, r: &SelfTestReport) {
    print_self_test(&format!("activated {what}"), r);
}

fn print_self_test(what: &str, r: &SelfTestReport) {
    let cpu = match (r.cpu_max_abs_diff, r.cpu_tolerance) {
        (Some(d), Some(t)) => format!("; packaged CPU result max |dp| {d:.2e} <= {t}"),
        _ => String::new(),
    };
    match r.tolerance {
        Some(t) => println!(
            "{what}: golden set passed on {} ({} images, max |dp| {:.2e} <= {t}{cpu})",
            r.provider, r.golden_items, r.max_abs_diff
        ),
        None => println!("{what}: smoke test passed on {} (bundle has no golden set)", r.provider),
    }
}

fn open_bundle(dir: &Path, trusted_keys: &[PathBuf], allow_unsigned: bool) -> Result<Bundle> {
    let bundle = Bundle::open(dir).with_context(|| format!("opening bundle {}", dir.display()))?;
    if trusted_keys.is_empty() {
        if !allow_unsigned {
            bail!("no --trusted-key given: pass the public key(s) the bundle must be signed with, or --allow-unsigned");
        }
        tracing::warn!(bundle = %bundle.label(), "signature not checked");
        return Ok(bundle);
    }
    let keys = TrustedKeys::from_files(trusted_keys).context("loading trusted keys")?;
    match bundle.verify(&keys).with_context(|| format!("verifying {}", bundle.label()))? {
        SignatureStatus::Verified { key_id } => tracing::info!(bundle = %bundle.label(), %key_id, "signature verified"),
        SignatureStatus::NotChecked => {}
    }
    Ok(bundle)
}

fn bench(args: BenchArgs) -> Result<ExitCode> {
    let bundle = open_bundle(&args.bundle, &args.trusted_keys, args.trusted_keys.is_empty())?;
    // The photos a hot folder would take by default.
    let extensions = attrd::sources::HotfolderConfig::default().extensions;
    let mut images: Vec<PathBuf> = std::fs::read_dir(&args.images)
        .with_context(|| format!("reading {}", args.images.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
            p.is_file() && extensions.contains(&ext)
        })
        .collect();
    images.sort();
    images.truncate(args.limit.unwrap_or(usize::MAX));
    if images.is_empty() {
        bail!("{} has no photos (extensions {})", args.images.display(), extensions.join(", "));
    }
    let mut pipeline = attrd::pipeline::PipelineConfig { max_batch: usize::from(args.batch), ..Default::default() };
    if let Some(w) = args.decode_workers {
        pipeline.decode_workers = w;
    }
    let mqtt = attrd::mqtt::MqttConfig {
        host: args.mqtt_host,
        port: args.mqtt_port,
        node: Some(args.node.clone()),
        client_id: Some(format!("attrd-bench-{}-{}", args.node, std::process::id())),
        ..Default::default()
    };
    let report = daemon::bench::run(daemon::bench::BenchOptions {
        bundle,
        images,
        providers: args.providers,
        threads: args.threads,
        sessions: usize::from(args.sessions),
        spin: args.spin,
        pipeline,
        mqtt,
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct InferLine<'a> {
    image: String,
    sha256: String,
    model: &'a attrd::payload::ModelInfo,
    attributes: &'a attrd::engine::Attributes,
}

fn infer(args: InferArgs) -> Result<ExitCode> {
    let bundle = open_bundle(&args.bundle, &args.trusted_keys, args.trusted_keys.is_empty())?;
    let cfg = EngineConfig {
        providers: args.providers.clone(),
        intra_threads: args.threads,
        cuda_tf32: args.cuda_tf32,
        allow_saturating_int8: args.allow_saturating_int8,
        ..EngineConfig::default()
    };
    let engine = Engine::load(&bundle, &cfg).with_context(|| format!("loading {}", bundle.label()))?;
    let pre = Preprocessor::new(bundle.manifest().input.clone(), Limits::default())
        .context("the bundle's input spec is invalid")?;
    let m = engine.manifest();
    let model = attrd::payload::ModelInfo::of(&engine);
    let mut failures = 0usize;
    let stdout = std::io::stdout();
    for chunk in args.images.chunks(args.batch as usize) {
        let mut ok = Vec::with_capacity(chunk.len());
        for path in chunk {
            match std::fs::read(path)
                .with_context(|| format!("reading {}", path.display()))
                .and_then(|bytes| Ok((pre.prepare(&bytes)?, attrd::bundle::sha256_bytes(&bytes))))
            {
                Ok((tensor, sha)) => ok.push((path, tensor, sha)),
                Err(e) => {
                    failures += 1;
                    eprintln!("attrd: {}: {e:#}", path.display());
                }
            }
        }
        if ok.is_empty() {
            continue;
        }
        let tensors: Vec<Vec<f32>> = ok.iter().map(|(_, t, _)| t.clone()).collect();
        let out = engine.infer_blocking(pre.batch(&tensors)).context("running the model")?;
        let attrs = out.attributes(m);
        let mut w = stdout.lock();
        for ((path, _, sha), a) in ok.iter().zip(&attrs) {
            let line =
                InferLine { image: path.display().to_string(), sha256: sha.clone(), model: &model, attributes: a };
            serde_json::to_writer(&mut w, &line)?;
            writeln!(w)?;
        }
    }
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
