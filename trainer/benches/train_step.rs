//! Throughput of one training step of the trainer's libtorch EfficientNet, for comparison with plain PyTorch
//! (`scripts/bench_train_step.py`, same flags and JSON); `scripts/bench-train-step` runs both and prints the ratio.
//!
//!   cargo bench -p trainer --features torch --bench train_step -- --arch lite0 --batch 32 --res 128 --json
//!
//! The step is a copy of the body of `fit`'s batch loop (trainer/src/torch/fit.rs) with the data pipeline replaced by
//! a fixed synthetic batch: per-group learning rates, host→device copy of the images (channels-last when asked),
//! forward under `tch::autocast`, fit's own masked label-smoothed cross-entropy per head (`fit::head_loss`) with the
//! per-head loss read back (fit logs it), backward of the scaled loss, unscale + global-norm check + clipping, AdamW
//! step. The loss scaler and the channels-last conversions are fit's own (`fit::LossScaler`, …); the loop body is
//! replicated, because fit's is interleaved with its data pipeline and progress reporting: keep the two in step when
//! fit.rs changes.
//! Hyperparameters come from `TrainConfig::default()`, so they follow whatever `trainer train` uses by default, and
//! are echoed in the JSON so the driver can check the Python peer used the same ones.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};
use trainer::effnet::Arch;
use trainer::torch::fit::{INITIAL_LOSS_SCALE, LossScaler, as_channels_last, head_loss, to_channels_last};
use trainer::torch::{
    BN_MOMENTUM, EffNet, GROUP_BACKBONE_DECAY, GROUP_BACKBONE_NO_DECAY, GROUP_HEAD_DECAY, GROUP_HEAD_NO_DECAY,
};
use trainer::train::TrainConfig;
use trainer::train::data::{HeadTargets, IGNORE};

/// Times training steps of the trainer's EfficientNet (ours) on a synthetic batch.
#[derive(Parser, Debug)]
struct Args {
    /// `lite0` or `b0`.
    #[arg(long, default_value = "lite0")]
    arch: Arch,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    batch: i64,
    /// Square input resolution in pixels.
    #[arg(long, default_value_t = 128)]
    res: i64,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Untimed steps first (allocator, cuDNN algorithm choice, AdamW state creation).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Intra-op threads (`tch::set_num_threads`); 0 leaves libtorch's default.
    #[arg(long, default_value_t = 0)]
    threads: i32,
    /// `cpu` or `cuda` (`cuda:N` also works).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// fp16 autocast with loss scaling (CUDA only, as in fit).
    #[arg(long)]
    amp: bool,
    /// Channels-last images and conv weights.
    #[arg(long)]
    channels_last: bool,
    /// Let cuDNN benchmark convolution algorithms (off by default, as in fit and in PyTorch).
    #[arg(long)]
    cudnn_benchmark: bool,
    /// Number of attribute heads.
    #[arg(long, default_value_t = 5)]
    heads: usize,
    /// Classes per head.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Seed of the weights, the batch and dropout.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// One JSON object on stdout instead of a human-readable line.
    #[arg(long)]
    json: bool,
    /// Added by `cargo bench` to harness-less targets; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    if args.amp && !device.is_cuda() {
        // fit turns AMP off on the CPU (`amp = cuda && cfg.amp`); CPU autocast would be bf16, a different thing.
        bail!("--amp needs --device cuda (fit uses fp16 autocast on CUDA only)");
    }
    if device.is_cuda() && !tch::Cuda::is_available() {
        // Without ATTRD_TORCH_CUDA=1 the linker drops libtorch_cuda and libtorch sees no GPU (see trainer/build.rs).
        bail!("libtorch sees no CUDA device: build with ATTRD_TORCH_CUDA=1 and run on a machine with a GPU");
    }
    if args.batch < 1 || args.res < 32 || args.steps == 0 || args.heads == 0 || args.classes == 0 {
        bail!("--batch, --steps, --heads and --classes must be positive and --res at least 32");
    }
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(args.cudnn_benchmark);
    }
    tch::manual_seed(args.seed);
    let cfg = TrainConfig::default();

    let mut vs = nn::VarStore::new(device);
    let specs: Vec<(String, usize)> = (0..args.heads).map(|h| (format!("head{h}"), args.classes)).collect();
    let model = EffNet::new(
        &vs.root(),
        args.arch,
        args.arch.default_padding(),
        args.arch.default_bn_eps(),
        &specs,
        cfg.dropout,
    )?
    .with_drop_path(cfg.drop_path)?;
    if args.channels_last {
        to_channels_last(&vs);
    }
    let mut opt = nn::AdamW { wd: cfg.weight_decay, ..Default::default() }.build(&vs, cfg.lr)?;
    opt.set_weight_decay_group(GROUP_BACKBONE_NO_DECAY, 0.0);
    opt.set_weight_decay_group(GROUP_HEAD_NO_DECAY, 0.0);
    // fit's batches arrive as host f32 buffers; keeping one on the host makes every step pay the same copy.
    let images = Tensor::randn([args.batch, 3, args.res, args.res], (Kind::Float, Device::Cpu));
    let targets = synthetic_targets(args.batch as usize, args.heads, args.classes);
    let mut scaler = LossScaler::new(args.amp, INITIAL_LOSS_SCALE);
    let mut step = Step { model: &model, vs: &mut vs, opt: &mut opt, cfg: &cfg, device, args: &args };

    let mut skipped = 0usize;
    for _ in 0..args.warmup {
        step.run(&images, &targets, &mut scaler)?;
    }
    sync(device);
    let mut ms = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        let t0 = Instant::now();
        if !step.run(&images, &targets, &mut scaler)? {
            skipped += 1;
        }
        // fit's loss read-backs already wait for the device, but the optimizer step after them is asynchronous.
        sync(device);
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    report(&args, &cfg, &ms, skipped, scaler.scale())
}

fn parse_device(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => Device::Cuda(
            other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("--device {other:?}: expected cpu, cuda or cuda:N"))?,
        ),
    })
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Per head, one label per image, deterministic so that the Python peer builds the identical batch: class
/// `(7 i + 3 h) mod classes`, and every tenth image unlabelled ([`IGNORE`]) so the loss masking is exercised.
fn synthetic_targets(batch: usize, heads: usize, classes: usize) -> Vec<HeadTargets> {
    (0..heads)
        .map(|h| {
            HeadTargets::Single(
                (0..batch).map(|i| if i % 10 == 9 { IGNORE } else { ((7 * i + 3 * h) % classes) as i64 }).collect(),
            )
        })
        .collect()
}

struct Step<'a> {
    model: &'a EffNet,
    vs: &'a mut nn::VarStore,
    opt: &'a mut nn::Optimizer,
    cfg: &'a TrainConfig,
    device: Device,
    args: &'a Args,
}

impl Step<'_> {
    /// One step of fit's batch loop (unfrozen backbone, no EMA, no class weights, head weights 1); false when the
    /// gradients were not finite and the step was skipped.
    fn run(&mut self, images: &Tensor, targets: &[HeadTargets], scaler: &mut LossScaler) -> Result<bool> {
        let (cfg, device) = (self.cfg, self.device);
        // fit sets these every step from the warm-up/cosine schedule; the value does not matter for timing.
        let lr = cfg.lr;
        self.opt.set_lr_group(GROUP_BACKBONE_DECAY, lr);
        self.opt.set_lr_group(GROUP_BACKBONE_NO_DECAY, lr);
        self.opt.set_lr_group(GROUP_HEAD_DECAY, lr * cfg.head_lr_mult);
        self.opt.set_lr_group(GROUP_HEAD_NO_DECAY, lr * cfg.head_lr_mult);
        let xs = images.to_device(device);
        let xs = if self.args.channels_last { as_channels_last(&xs) } else { xs };
        let logits = tch::autocast(self.args.amp, || self.model.f_forward_heads_t(&xs, true))?;
        let mut loss = Tensor::zeros([], (Kind::Float, device));
        let mut head_sum = 0.0;
        for (l, t) in logits.iter().zip(targets) {
            // Every head has known labels here, so there is always a loss (fit skips heads without any).
            let Some(hl) = head_loss(l, t, cfg.label_smoothing, None, device)? else { continue };
            // fit reads every head's loss back for its per-head averages: a device sync per head on CUDA.
            head_sum += hl.double_value(&[]);
            // Times the head weight (1 here), as fit does.
            loss += hl * 1.0;
        }
        let lv = loss.double_value(&[]);
        std::hint::black_box((head_sum, lv));
        self.opt.zero_grad();
        (&loss * scaler.scale()).backward();
        Ok(scaler.step(self.opt, self.vs, cfg.clip_grad_norm)?)
    }
}

fn report(args: &Args, cfg: &TrainConfig, ms: &[f64], skipped: usize, loss_scale: f64) -> Result<()> {
    let mut sorted = ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
    let mean = sorted.iter().sum::<f64>() / n as f64;
    let images_per_s = args.batch as f64 / (median / 1e3);
    let arch = match args.arch {
        Arch::B0 => "b0",
        Arch::Lite0 => "lite0",
    };
    let threads = tch::get_num_threads();
    if args.json {
        let out = serde_json::json!({
            "impl": "ours (tch 0.24)",
            "arch": arch,
            "device": args.device,
            "batch": args.batch,
            "res": args.res,
            "threads": threads,
            "amp": args.amp,
            "channels_last": args.channels_last,
            "cudnn_benchmark": args.cudnn_benchmark,
            "heads": args.heads,
            "classes": args.classes,
            "warmup": args.warmup,
            "steps": args.steps,
            "skipped_steps": skipped,
            "loss_scale": loss_scale,
            "median_ms": median,
            "mean_ms": mean,
            "min_ms": sorted[0],
            "max_ms": sorted[n - 1],
            "images_per_s": images_per_s,
            "hparams": {
                "lr": cfg.lr,
                "head_lr_mult": cfg.head_lr_mult,
                "weight_decay": cfg.weight_decay,
                "label_smoothing": cfg.label_smoothing,
                "clip_grad_norm": cfg.clip_grad_norm,
                "dropout": cfg.dropout,
                "drop_path": cfg.drop_path,
                "bn_eps": args.arch.default_bn_eps(),
                "bn_momentum": BN_MOMENTUM,
            },
        });
        println!("{out}");
    } else {
        println!(
            "ours {arch} {} batch {} res {} threads {threads} amp {} channels_last {}: {median:.1} ms/step (median of \
             {n}, mean {mean:.1}), {images_per_s:.1} images/s, {skipped} skipped",
            args.device, args.batch, args.res, args.amp, args.channels_last
        );
    }
    Ok(())
}
