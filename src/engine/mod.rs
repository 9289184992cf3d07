//! ONNX Runtime inference for one bundle.
//!
//! Each session lives on its own thread: ORT's `run` is blocking and CPU-heavy, and keeping it off the async runtime
//! keeps capture, HTTP and MQTT responsive while a batch runs. Callers send a batch and wait on a oneshot channel,
//! either blocking (`infer_blocking`) or async (`infer`); with several sessions (`EngineConfig::sessions`) whichever
//! session is free takes the next batch.

pub mod postprocess;

use crate::bundle::{Bundle, Manifest};
use crate::preprocess::Layout;
use ndarray::{Array2, Array4};
use ort::ep::ExecutionProviderDispatch;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{TensorElementType, TensorRef, ValueType};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

pub use postprocess::{Attribute, Attributes, Decision, Scored};

/// ONNX Runtime execution providers attrd knows how to configure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cuda,
    #[serde(rename = "tensorrt")]
    TensorRt,
    Cpu,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Cuda => "cuda",
            Provider::TensorRt => "tensorrt",
            Provider::Cpu => "cpu",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Provider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cuda" => Ok(Provider::Cuda),
            "tensorrt" | "trt" => Ok(Provider::TensorRt),
            "cpu" => Ok(Provider::Cpu),
            other => Err(format!("unknown execution provider {other:?} (expected cuda, tensorrt or cpu)")),
        }
    }
}

/// How to run models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Execution providers to try, in order; the first that registers serves and each one that fails is logged and
    /// reported as a fallback. CPU is always appended as the last resort if missing.
    pub providers: Vec<Provider>,
    /// Threads ONNX Runtime uses inside one operator, per session; 0 lets ORT choose (one per physical core), or
    /// with several `sessions`, divides the logical CPUs among them.
    pub intra_threads: usize,
    /// Sessions of the model that run batches side by side on the CPU provider, each on its own thread with its own
    /// ORT thread pool and its own copy of the model's weights and buffers (a GPU provider always gets one).
    /// Default 1. On a small CPU, 2 sessions of 1 thread took 1.1–1.6 times the images/s of 1 session of 2 threads,
    /// INT8 most (ONNX Runtime's threads share out this small model's layers poorly; `docs/benchmarks.md`, "Two
    /// sessions side by side"). A batch alone then runs on fewer threads, so an idle box answers a little later.
    pub sessions: usize,
    /// Let those threads spin-wait for work between operators instead of sleeping (ORT's
    /// `session.intra_op.allow_spinning`, on by default as in ORT). Measured end to end on 2 cores
    /// (`docs/benchmarks.md`, P1): spinning is about 8 % faster when inference is the bottleneck (small photos), and
    /// about 20 % slower when decoding is (24 MP studio photos), because the spinning threads take the cores the
    /// decode workers need. Turn it off on small boxes that mostly decode large photos.
    pub intra_spinning: bool,
    /// Path of `libonnxruntime.so`. Unset: `ORT_DYLIB_PATH`, then `../lib/` and the directory of the executable, then
    /// the system's library search path.
    pub ort_library: Option<PathBuf>,
    /// GPU ordinal for CUDA and TensorRT.
    pub device_id: i32,
    /// Where TensorRT keeps built engines between runs; unset disables the cache. Engines are kept under
    /// `<dir>/<GPU>/<TensorRT version>/` with the model's SHA-256 as file prefix, so a new model, a different GPU or
    /// a TensorRT upgrade never picks up a stale engine.
    pub tensorrt_cache_dir: Option<PathBuf>,
    /// Providers whose sessions take long to build (TensorRT compiles an engine for minutes on first use). When the
    /// first provider of `providers` is listed here, the daemon serves at once with the rest of the chain and swaps
    /// to it once it is built and has passed the golden set; progress is logged and published in `model/state`.
    pub build_in_background: Vec<Provider>,
    /// Let cuBLAS use TF32 tensor-core math on Ampere and newer GPUs (ORT's `use_tf32`). cuDNN convolutions use TF32
    /// regardless unless the service environment sets `NVIDIA_TF32_OVERRIDE=0` (measured on an H100: probabilities
    /// within 2e-3 of the CPU's with TF32, 3e-6 without; see docs/gpu.md).
    pub cuda_tf32: bool,
    /// Serve a bundle on the CPU provider even though its INT8 weights can saturate this CPU's integer kernels (a
    /// model quantized with `trainer quantize --weight-range full`, on an x86 CPU without VNNI). Off, such a bundle
    /// is refused at load, because its results would differ from the ones it was validated with; on is for
    /// diagnosis only (`scripts/check-int8-portability`).
    pub allow_saturating_int8: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            providers: vec![Provider::Cuda, Provider::TensorRt, Provider::Cpu],
            intra_threads: 0,
            sessions: 1,
            intra_spinning: true,
            ort_library: None,
            device_id: 0,
            tensorrt_cache_dir: None,
            build_in_background: vec![Provider::TensorRt],
            cuda_tf32: true,
            allow_saturating_int8: false,
        }
    }
}

impl EngineConfig {
    /// A CPU-only configuration (tests, tools, boxes without a GPU).
    pub fn cpu() -> Self {
        Self { providers: vec![Provider::Cpu], ..Self::default() }
    }

    /// The preferred provider when it is built in the background (see [`EngineConfig::build_in_background`]).
    pub fn deferred(&self) -> Option<Provider> {
        self.providers.first().copied().filter(|p| self.build_in_background.contains(p))
    }

    /// The configuration to serve with while [`EngineConfig::deferred`] builds: the chain without it.
    pub fn foreground(&self) -> EngineConfig {
        let Some(d) = self.deferred() else { return self.clone() };
        Self { providers: self.providers.iter().copied().filter(|p| *p != d).collect(), ..self.clone() }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(
        "cannot load ONNX Runtime from {path}: {reason} (run ./scripts/setup, or set engine.ort_library / ORT_DYLIB_PATH)"
    )]
    Library { path: PathBuf, reason: String },
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error("cannot load {path}: {reason}")]
    Session { path: PathBuf, reason: String },
    #[error("model does not match its manifest: {0}")]
    Mismatch(String),
    #[error("batch has shape {got:?}, the model expects [N, {expected:?}]")]
    BadBatch { got: Vec<usize>, expected: Vec<usize> },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("head {head:?} produced a non-finite value (NaN or infinity)")]
    NonFinite { head: String },
    #[error("the inference thread has stopped")]
    Stopped,
    #[error(
        "{model}: its INT8 weights use the full 8-bit range (`trainer quantize --weight-range full`), which this CPU's \
         integer kernels saturate on (x86 without VNNI): its results would differ from the validated ones. Requantize \
         with `--weight-range safe` (the default), or serve it on a VNNI CPU or a GPU"
    )]
    SaturatingInt8 { model: String },
}

/// Key of the ONNX metadata entry in which `trainer quantize` records the weight range of an INT8 model
/// (`safe`, `reduced` or `full`).
pub const INT8_WEIGHT_RANGE_KEY: &str = "attrd.int8_weight_range";

/// Whether this CPU's INT8 kernels in ONNX Runtime can saturate on full-range 8-bit weights: x86 without VNNI, where
/// MLAS adds u8×s8 product pairs in i16 (`vpmaddubsw`). VNNI CPUs (AVX512-VNNI, AVX-VNNI, and AMX ones, which have
/// both) accumulate in i32; other architectures widen before multiplying.
pub fn cpu_saturates_int8() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !(std::arch::is_x86_feature_detected!("avx512vnni") || std::arch::is_x86_feature_detected!("avxvnni"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn ort_err(e: impl fmt::Display) -> EngineError {
    EngineError::Ort(e.to_string())
}

/// What the provider chain resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderReport {
    /// The provider that serves (the first one that registered).
    pub active: Provider,
    /// Providers before it that could not be used, with the reason.
    pub fallbacks: Vec<ProviderFallback>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderFallback {
    pub provider: Provider,
    pub reason: String,
}

struct Runtime {
    env: Arc<ort::environment::Environment>,
    library: PathBuf,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// Loads ONNX Runtime once per process. The first caller's library path wins; later calls reuse it.
fn runtime(cfg: &EngineConfig) -> Result<&'static Runtime, EngineError> {
    let library = resolve_library(cfg.ort_library.as_deref());
    RUNTIME
        .get_or_init(|| {
            let builder = ort::init_from(&library).map_err(|e| format!("{e}"))?;
            let env = builder.with_name("attrd").build().map_err(|e| format!("{e}"))?;
            // ort's `tracing` bridge creates the environment at VERBOSE, so ONNX Runtime would format every verbose
            // message only for the subscriber to drop it; ask for what the log filter shows (set at start-up).
            env.set_log_level(ort_log_level());
            tracing::info!(library = %library.display(), "ONNX Runtime loaded");
            Ok(Runtime { env: Arc::new(env), library: library.clone() })
        })
        .as_ref()
        .map_err(|reason| EngineError::Library { path: library, reason: reason.clone() })
}

/// The most detailed ONNX Runtime severity the current `tracing` filter lets through (ort logs under target `ort`;
/// VERBOSE arrives as TRACE).
fn ort_log_level() -> ort::logging::LogLevel {
    use ort::logging::LogLevel;
    if tracing::enabled!(target: "ort", tracing::Level::TRACE) {
        LogLevel::Verbose
    } else if tracing::enabled!(target: "ort", tracing::Level::INFO) {
        LogLevel::Info
    } else {
        LogLevel::Warning
    }
}

/// The ORT library path the engine will load (see [`EngineConfig::ort_library`]).
pub fn resolve_library(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        for cand in [dir.join("../lib/libonnxruntime.so"), dir.join("libonnxruntime.so")] {
            if cand.exists() {
                return cand;
            }
        }
    }
    PathBuf::from("libonnxruntime.so")
}

/// The process's ONNX Runtime environment (ORT allows only one), loading the library on first use. For code that
/// builds its own sessions, e.g. the trainer's quantizer and tests.
pub fn environment(cfg: &EngineConfig) -> Result<Arc<ort::environment::Environment>, EngineError> {
    Ok(runtime(cfg)?.env.clone())
}

/// ONNX Runtime graph transformers every session of ours turns off. `WeightBiasQuantization` (ORT ≥ 1.2x) gives any
/// `Conv`/`Gemm` that reads a `DequantizeLinear` output and has fp32 weights **per-tensor** int8 weights, so a layer
/// that `trainer quantize` measured and kept in fp32 would silently run quantized, and far worse than its own
/// per-channel INT8 form (depthwise convolutions lose most of their channels). Measured with ORT 1.32 on the fashion
/// model: keeping `blocks.0.dw.conv` fp32 moved logits by up to 13 against the graph's own QDQ arithmetic, and by
/// 0.6 with this transformer off.
pub const DISABLED_OPTIMIZERS: &str = "WeightBiasQuantization";

/// A session builder with the engine's graph settings: every optimisation ORT has ([`GraphOptimizationLevel::All`])
/// except [`DISABLED_OPTIMIZERS`]. The trainer's quantizer and the benchmarks use it too, so that what they measure
/// is what the daemon runs.
pub fn session_builder(env: &ort::environment::Environment) -> ort::Result<ort::session::builder::SessionBuilder> {
    Ok(Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_disabled_optimizers(DISABLED_OPTIMIZERS)?)
}

/// The ORT library actually loaded in this process, if any.
pub fn loaded_library() -> Option<&'static Path> {
    RUNTIME.get().and_then(|r| r.as_ref().ok()).map(|r| r.library.as_path())
}

/// Model outputs for one batch: logits per head (manifest order), each `[N, classes]`.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    pub logits: Vec<Array2<f32>>,
    /// When `Session::run` began, and the time spent inside it.
    pub run_started: Instant,
    pub run_time: Duration,
}

impl BatchOutput {
    /// Probabilities per image, per head (after temperature).
    pub fn probabilities(&self, manifest: &Manifest) -> Vec<Vec<Vec<f32>>> {
        let n = self.logits.first().map_or(0, |l| l.nrows());
        (0..n)
            .map(|i| {
                manifest
                    .heads
                    .iter()
                    .zip(&self.logits)
                    .map(|(h, l)| postprocess::probabilities(h, l.row(i).as_slice().unwrap_or(&l.row(i).to_vec())))
                    .collect()
            })
            .collect()
    }

    /// Attributes per image.
    pub fn attributes(&self, manifest: &Manifest) -> Vec<Attributes> {
        self.probabilities(manifest).iter().map(|p| postprocess::attributes(manifest, p)).collect()
    }
}

struct Job {
    batch: Array4<f32>,
    reply: tokio::sync::oneshot::Sender<Result<BatchOutput, EngineError>>,
}

type Reply = tokio::sync::oneshot::Receiver<Result<BatchOutput, EngineError>>;

/// A loaded model, ready to run batches. Cheap to clone; all clones feed the same session thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::SyncSender<Job>,
    sessions: usize,
    manifest: Arc<Manifest>,
    report: ProviderReport,
    input_shape: [usize; 3],
    model_sha256: String,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.manifest.name)
            .field("version", &self.manifest.version.to_string())
            .field("provider", &self.report.active)
            .finish()
    }
}

impl Engine {
    /// Creates a session for the bundle's ONNX file with the configured provider chain and checks the graph's input
    /// and outputs against the manifest.
    pub fn load(bundle: &Bundle, cfg: &EngineConfig) -> Result<Self, EngineError> {
        let mut chain = cfg.providers.clone();
        if !chain.contains(&Provider::Cpu) {
            chain.push(Provider::Cpu);
        }
        Self::load_chain(bundle, cfg, chain, false)
    }

    /// Like [`Engine::load`] but on `provider` alone: fails instead of falling back when it cannot be registered.
    pub fn load_on(bundle: &Bundle, cfg: &EngineConfig, provider: Provider) -> Result<Self, EngineError> {
        Self::load_chain(bundle, cfg, vec![provider], true)
    }

    fn load_chain(
        bundle: &Bundle,
        cfg: &EngineConfig,
        chain: Vec<Provider>,
        strict: bool,
    ) -> Result<Self, EngineError> {
        let rt = runtime(cfg)?;
        let started = Instant::now();
        let manifest = bundle.manifest().clone();
        let onnx = bundle.onnx_path();
        let bytes =
            bundle.read_onnx().map_err(|e| EngineError::Session { path: onnx.clone(), reason: e.to_string() })?;
        let mut n = cfg.sessions.max(1);
        let threads = match (cfg.intra_threads, n) {
            (0, 1) => 0,
            // ORT's own default (every core) in each session would put n threads on every core.
            (0, n) => std::thread::available_parallelism().map_or(1, |c| (c.get() / n).max(1)),
            (t, _) => t,
        };
        let per_session = EngineConfig { intra_threads: threads, ..cfg.clone() };
        let (first, report) = build_session(&rt.env, bundle, &per_session, &chain, strict, &bytes, false)?;
        if n > 1 && report.active != Provider::Cpu {
            // A GPU runs one batch at a time anyway, and each session would hold its own copy of the model (and,
            // for TensorRT, build its own engine). The one built keeps its share of the CPU threads, which only
            // the nodes the GPU provider leaves to the CPU use.
            tracing::info!(provider = %report.active, sessions = n, "engine.sessions applies to the CPU provider; one session");
            n = 1;
        }
        let mut sessions = Vec::with_capacity(n);
        sessions.push(first);
        while sessions.len() < n {
            // The chain's outcome was logged for the first session; the others repeat it.
            let (session, r) = build_session(&rt.env, bundle, &per_session, &chain, strict, &bytes, true)?;
            if r.active != report.active {
                // Each session registers the same chain; a provider that fails for the second is out of memory or
                // gone, and serving on two different providers would give two sets of results.
                return Err(EngineError::Ort(format!(
                    "the sessions of {} resolved to different execution providers ({} and {})",
                    bundle.label(),
                    report.active,
                    r.active
                )));
            }
            sessions.push(session);
        }
        let input_shape = check_io(&sessions[0], &manifest)?;
        if report.active == Provider::Cpu && !cfg.allow_saturating_int8 && cpu_saturates_int8() {
            let range = sessions[0].metadata().ok().and_then(|m| m.custom(INT8_WEIGHT_RANGE_KEY));
            if range.as_deref() == Some("full") {
                return Err(EngineError::SaturatingInt8 { model: bundle.label() });
            }
        }
        // Room for a batch waiting behind each one running.
        let (tx, rx) = mpsc::sync_channel::<Job>(4.max(2 * n));
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let heads: Vec<(String, usize)> = manifest.heads.iter().map(|h| (h.name.clone(), h.classes.len())).collect();
        for (i, session) in sessions.into_iter().enumerate() {
            let (rx, input_name, heads) = (rx.clone(), manifest.input_name.clone(), heads.clone());
            std::thread::Builder::new()
                .name(format!("ort-{}-{i}", manifest.name))
                .spawn(move || session_thread(session, rx, input_name, heads))
                .map_err(|e| EngineError::Ort(format!("cannot start the inference thread: {e}")))?;
        }
        tracing::info!(
            model = %bundle.label(),
            provider = %report.active,
            fallbacks = report.fallbacks.len(),
            sessions = n,
            intra_threads = threads,
            load_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        Ok(Self {
            tx,
            sessions: n,
            manifest: Arc::new(manifest),
            report,
            input_shape,
            model_sha256: bundle.onnx_sha256().to_string(),
        })
    }

    /// Batches this engine runs at once ([`EngineConfig::sessions`]).
    pub fn parallelism(&self) -> usize {
        self.sessions
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Which execution provider serves and which ones fell back.
    pub fn providers(&self) -> &ProviderReport {
        &self.report
    }

    /// SHA-256 of the ONNX file this engine runs.
    pub fn model_sha256(&self) -> &str {
        &self.model_sha256
    }

    /// The per-image input shape (`[3, H, W]` or `[H, W, 3]`).
    pub fn input_shape(&self) -> [usize; 3] {
        self.input_shape
    }

    fn job(&self, batch: Array4<f32>) -> Result<(Job, Reply), EngineError> {
        let shape = batch.shape();
        if shape[1..] != self.input_shape[..] || shape[0] == 0 {
            return Err(EngineError::BadBatch { got: shape.to_vec(), expected: self.input_shape.to_vec() });
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        Ok((Job { batch, reply }, rx))
    }

    /// Runs one batch, blocking the calling thread (not for use on an async runtime thread).
    pub fn infer_blocking(&self, batch: Array4<f32>) -> Result<BatchOutput, EngineError> {
        let (job, rx) = self.job(batch)?;
        self.tx.send(job).map_err(|_| EngineError::Stopped)?;
        rx.blocking_recv().map_err(|_| EngineError::Stopped)?
    }

    /// Runs one batch without blocking the async runtime.
    pub async fn infer(&self, batch: Array4<f32>) -> Result<BatchOutput, EngineError> {
        let (job, rx) = self.job(batch)?;
        match self.tx.try_send(job) {
            Ok(()) => {}
            // A full queue waits for the inference thread, which can take a few batches' time: off the async
            // workers, which have other work.
            Err(mpsc::TrySendError::Full(job)) => {
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || tx.send(job))
                    .await
                    .map_err(|_| EngineError::Stopped)?
                    .map_err(|_| EngineError::Stopped)?;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(EngineError::Stopped),
        }
        rx.await.map_err(|_| EngineError::Stopped)?
    }
}

/// One session of `bundle` (its ONNX file's checked `bytes`) with `cfg.intra_threads` threads, on the first
/// provider of `chain` that registers; `quiet` logs the providers' outcome at debug level only.
fn build_session(
    env: &ort::environment::Environment,
    bundle: &Bundle,
    cfg: &EngineConfig,
    chain: &[Provider],
    strict: bool,
    bytes: &[u8],
    quiet: bool,
) -> Result<(Session, ProviderReport), EngineError> {
    let mut builder = session_builder(env).map_err(ort_err)?;
    if cfg.intra_threads > 0 {
        builder = builder.with_intra_threads(cfg.intra_threads).map_err(ort_err)?;
    }
    builder = builder.with_intra_op_spinning(cfg.intra_spinning).map_err(ort_err)?;
    let mut fallbacks = Vec::new();
    let mut active = None;
    for &p in chain {
        let dispatch = dispatch(p, cfg, bundle.onnx_sha256());
        match dispatch.register(&mut builder) {
            Ok(()) => {
                if !quiet {
                    tracing::info!(provider = %p, model = %bundle.label(), "execution provider registered");
                }
                if p == Provider::TensorRt {
                    // ORT's advice: CUDA behind TensorRT runs what TensorRT cannot, instead of the CPU.
                    match self::dispatch(Provider::Cuda, cfg, bundle.onnx_sha256()).register(&mut builder) {
                        Ok(()) => tracing::debug!("CUDA registered behind TensorRT for unsupported nodes"),
                        Err(e) => {
                            tracing::warn!(reason = %e, "CUDA unavailable behind TensorRT; unsupported nodes run on the CPU")
                        }
                    }
                }
                active = Some(p);
                break;
            }
            Err(e) => {
                let reason = e.to_string();
                if quiet {
                    tracing::debug!(provider = %p, %reason, "execution provider unavailable, falling back to the next");
                } else {
                    tracing::warn!(provider = %p, %reason, "execution provider unavailable, falling back to the next");
                }
                fallbacks.push(ProviderFallback { provider: p, reason });
            }
        }
    }
    if strict && active.is_none() {
        let why = fallbacks.iter().map(|f| format!("{}: {}", f.provider, f.reason)).collect::<Vec<_>>().join("; ");
        return Err(EngineError::Ort(format!("execution provider unavailable: {why}")));
    }
    // CPU is built into every ONNX Runtime; if even it failed to register, the session still runs on ORT's
    // default CPU kernels, so report CPU rather than failing.
    let active = active.unwrap_or(Provider::Cpu);
    let session = builder
        .commit_from_memory(bytes)
        .map_err(|e| EngineError::Session { path: bundle.onnx_path(), reason: e.to_string() })?;
    Ok((session, ProviderReport { active, fallbacks }))
}

fn dispatch(p: Provider, cfg: &EngineConfig, model_sha256: &str) -> ExecutionProviderDispatch {
    use ort::ep;
    match p {
        Provider::Cuda => {
            ep::CUDA::default().with_device_id(cfg.device_id).with_tf32(cfg.cuda_tf32).build().error_on_failure()
        }
        Provider::TensorRt => {
            let mut trt = ep::TensorRT::default().with_device_id(cfg.device_id);
            if let Some(root) = &cfg.tensorrt_cache_dir {
                // ORT's cache names hold a graph hash and the compute capability, not the GPU model or the TensorRT
                // version, and a stale engine fails or misbehaves: key the directory by both, the prefix by model.
                let dir = tensorrt_cache_path(root, cfg.device_id, &[loaded_library_dir()]);
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot create the TensorRT engine cache");
                }
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(dir.display())
                    .with_engine_cache_prefix(&model_sha256[..16.min(model_sha256.len())])
                    .with_timing_cache(true)
                    .with_timing_cache_path(dir.display());
            }
            trt.build().error_on_failure()
        }
        // ort's CPU provider turns ONNX Runtime's memory arena off unless asked; without it every run mallocs (and
        // page-faults) its activations afresh: 25-30 % slower than ONNX Runtime's own default (scripts/bench-infer).
        Provider::Cpu => ep::CPU::default().with_arena_allocator(true).build().error_on_failure(),
    }
}

fn loaded_library_dir() -> PathBuf {
    loaded_library().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default()
}

/// `<root>/<GPU>/<TensorRT version>`: the engine cache directory for this GPU and TensorRT.
pub fn tensorrt_cache_path(root: &Path, device_id: i32, lib_dirs: &[PathBuf]) -> PathBuf {
    let gpu = gpu_key(Path::new("/proc/driver/nvidia/gpus"), device_id).unwrap_or_else(|| format!("gpu{device_id}"));
    let trt = tensorrt_version(lib_dirs).map_or_else(|| "trt-unknown".to_string(), |v| format!("trt-{v}"));
    root.join(gpu).join(trt)
}

/// The GPU's model and PCI address from the NVIDIA driver's `/proc` files (`<model>-<bus id>`, file-name safe),
/// taking the `device_id`-th GPU in PCI order (CUDA's order with `CUDA_DEVICE_ORDER=PCI_BUS_ID`, which the unit
/// sets).
pub fn gpu_key(proc_gpus: &Path, device_id: i32) -> Option<String> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(proc_gpus).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    dirs.sort();
    let dir = dirs.get(usize::try_from(device_id).ok()?)?;
    let info = std::fs::read_to_string(dir.join("information")).ok()?;
    let model = info.lines().find_map(|l| l.strip_prefix("Model:")).map(str::trim)?;
    let bus = dir.file_name()?.to_string_lossy().into_owned();
    let safe =
        |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect::<String>();
    Some(format!("{}-{}", safe(model), safe(&bus)))
}

/// TensorRT's version from the name of `libnvinfer.so.<version>` in `lib_dirs` or on `LD_LIBRARY_PATH`.
pub fn tensorrt_version(lib_dirs: &[PathBuf]) -> Option<String> {
    let env_dirs = std::env::var_os("LD_LIBRARY_PATH").map(|v| std::env::split_paths(&v).collect::<Vec<_>>());
    let dirs = lib_dirs.iter().cloned().chain(env_dirs.unwrap_or_default());
    let mut best: Option<String> = None;
    for d in dirs {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(v) = name.strip_prefix("libnvinfer.so.")
                && v.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                && best.as_ref().is_none_or(|b| v.len() > b.len())
            {
                // The longest name is the fully versioned file (libnvinfer.so.10.3.0 over its .10 link).
                best = Some(v.to_owned());
            }
        }
    }
    best
}

fn check_io(session: &Session, m: &Manifest) -> Result<[usize; 3], EngineError> {
    let spec = &m.input;
    let (h, w) = (spec.height as usize, spec.width as usize);
    let per_image = match spec.layout {
        Layout::Nchw => [3, h, w],
        Layout::Nhwc => [h, w, 3],
    };
    let inputs = session.inputs();
    if inputs.len() != 1 || inputs[0].name() != m.input_name {
        return Err(EngineError::Mismatch(format!(
            "manifest expects one input {:?}, the graph has {:?}",
            m.input_name,
            inputs.iter().map(|i| i.name()).collect::<Vec<_>>()
        )));
    }
    check_tensor("input", inputs[0].name(), inputs[0].dtype(), &per_image)?;
    let outputs = session.outputs();
    let graph_names: Vec<&str> = outputs.iter().map(|o| o.name()).collect();
    for head in &m.heads {
        let Some(o) = outputs.iter().find(|o| o.name() == head.name) else {
            return Err(EngineError::Mismatch(format!(
                "head {:?} has no graph output of that name (outputs: {graph_names:?})",
                head.name
            )));
        };
        check_tensor("output", o.name(), o.dtype(), &[head.classes.len()])?;
    }
    if let Some(extra) = outputs.iter().find(|o| m.head(o.name()).is_none()) {
        return Err(EngineError::Mismatch(format!("graph output {:?} is not a head in the manifest", extra.name())));
    }
    Ok(per_image)
}

/// Checks dtype f32 and shape `[batch, dims...]`, where the batch dimension may be dynamic.
fn check_tensor(kind: &str, name: &str, ty: &ValueType, dims: &[usize]) -> Result<(), EngineError> {
    let (Some(t), Some(shape)) = (ty.tensor_type(), ty.tensor_shape()) else {
        return Err(EngineError::Mismatch(format!("{kind} {name:?} is not a tensor")));
    };
    if t != TensorElementType::Float32 {
        return Err(EngineError::Mismatch(format!("{kind} {name:?} is {t:?}, expected float32")));
    }
    let want: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    let ok = shape.len() == dims.len() + 1 && shape[1..] == want[..];
    if !ok {
        return Err(EngineError::Mismatch(format!(
            "{kind} {name:?} has shape {:?}, the manifest implies [batch, {}]",
            &shape[..],
            dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}

/// `heads`: each output's name and the number of classes the manifest gives it.
fn session_thread(
    mut session: Session,
    rx: Arc<std::sync::Mutex<mpsc::Receiver<Job>>>,
    input_name: String,
    heads: Vec<(String, usize)>,
) {
    loop {
        // The lock is held only while waiting for the next job; the run happens outside it, beside the other
        // sessions'. A poisoned lock only means another session thread panicked: the receiver is still whole.
        let next = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
        let Ok(job) = next else { break };
        let result = run_batch(&mut session, &input_name, &heads, &job.batch);
        // The caller may have given up waiting (e.g. shutdown); nothing to do then.
        let _ = job.reply.send(result);
    }
    tracing::debug!("inference thread exiting: all engine handles dropped");
}

fn run_batch(
    session: &mut Session,
    input: &str,
    heads: &[(String, usize)],
    batch: &Array4<f32>,
) -> Result<BatchOutput, EngineError> {
    let n = batch.shape()[0];
    let tensor = TensorRef::from_array_view(batch.view()).map_err(|e| EngineError::Run(e.to_string()))?;
    let started = Instant::now();
    let outputs = session.run(ort::inputs![input => tensor]).map_err(|e| EngineError::Run(e.to_string()))?;
    let run_time = started.elapsed();
    let mut logits = Vec::with_capacity(heads.len());
    for (head, expected) in heads {
        let value = outputs.get(head).ok_or_else(|| EngineError::Run(format!("output {head:?} missing")))?;
        let (shape, data) = value.try_extract_tensor::<f32>().map_err(|e| EngineError::Run(e.to_string()))?;
        if shape.len() != 2 || shape[0] as usize != n {
            return Err(EngineError::Run(format!("output {head:?} has shape {:?} for a batch of {n}", &shape[..])));
        }
        if data.iter().any(|v| !v.is_finite()) {
            return Err(EngineError::NonFinite { head: head.clone() });
        }
        // ONNX Runtime only warns when an output differs from its declared shape; a width other than the manifest's
        // would put probabilities under the wrong class names, or index past them.
        let classes = shape[1] as usize;
        if classes != *expected {
            return Err(EngineError::Run(format!(
                "output {head:?} has {classes} classes, the manifest lists {expected}"
            )));
        }
        let arr = Array2::from_shape_vec((n, classes), data.to_vec()).map_err(|e| EngineError::Run(e.to_string()))?;
        logits.push(arr);
    }
    Ok(BatchOutput { logits, run_started: started, run_time })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preferred_provider_is_deferred_only_when_listed() {
        let trt_first = EngineConfig { providers: vec![Provider::TensorRt, Provider::Cuda], ..EngineConfig::default() };
        assert_eq!(trt_first.deferred(), Some(Provider::TensorRt));
        assert_eq!(trt_first.foreground().providers, vec![Provider::Cuda]);
        // CUDA first: TensorRT would never serve, so nothing is built in the background.
        let default = EngineConfig::default();
        assert_eq!(default.deferred(), None);
        assert_eq!(default.foreground(), default);
        let eager = EngineConfig { build_in_background: vec![], ..trt_first.clone() };
        assert_eq!(eager.deferred(), None);
    }

    #[test]
    fn tensorrt_cache_is_keyed_by_gpu_and_tensorrt_version() {
        let tmp = tempfile::tempdir().unwrap();
        let gpus = tmp.path().join("gpus");
        for (bus, model) in [("0000:c1:00.0", "NVIDIA L4"), ("0000:41:00.0", "NVIDIA H100 80GB HBM3")] {
            std::fs::create_dir_all(gpus.join(bus)).unwrap();
            std::fs::write(gpus.join(bus).join("information"), format!("Model: \t\t {model}\nIRQ: 1\n")).unwrap();
        }
        assert_eq!(gpu_key(&gpus, 0).as_deref(), Some("NVIDIA-H100-80GB-HBM3-0000-41-00.0"));
        assert_eq!(gpu_key(&gpus, 1).as_deref(), Some("NVIDIA-L4-0000-c1-00.0"));
        assert_eq!(gpu_key(&gpus, 2), None);
        assert_eq!(gpu_key(&tmp.path().join("none"), 0), None);

        let lib = tmp.path().join("lib");
        std::fs::create_dir_all(&lib).unwrap();
        assert_eq!(tensorrt_version(std::slice::from_ref(&lib)), None);
        for f in ["libnvinfer.so.10", "libnvinfer.so.10.3.0", "libnvinfer_plugin.so.10.3.0", "libnvinfer.so.x"] {
            std::fs::write(lib.join(f), b"").unwrap();
        }
        assert_eq!(tensorrt_version(std::slice::from_ref(&lib)).as_deref(), Some("10.3.0"));
        let p = tensorrt_cache_path(Path::new("/cache"), 0, &[lib]);
        assert!(p.starts_with("/cache") && p.ends_with("trt-10.3.0"), "{}", p.display());
    }
}
