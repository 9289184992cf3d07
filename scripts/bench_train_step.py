#!/usr/bin/env python3
"""Plain-PyTorch peer of trainer/benches/train_step.rs: times training steps of EfficientNet-B0 / -Lite0 with
attribute heads, written the way one would in PyTorch (torchvision's module structure, torch.optim.AdamW, torch.autocast
+ GradScaler, clip_grad_norm_), with the same flags and JSON fields. scripts/bench-train-step runs both and prints the
ratio.

    .venv/bin/python scripts/bench_train_step.py --arch lite0 --batch 32 --res 128 --json

torchvision is not a dependency, so the model is written out here: the block table of trainer/src/effnet.rs, which is
torchvision's efficientnet_b0 (SiLU, squeeze-excite with in_ch/4 channels, stochastic depth "row" mode at rate
p * i / 16) or EfficientNet-Lite0 (ReLU6, no squeeze-excite); symmetric k/2 padding; batch norm eps 1e-3 and
momentum 0.01 like ours; dropout before each linear head on the pooled 1280-d features. Hyperparameter defaults are
trainer's TrainConfig defaults; both benches echo them in the JSON and the driver checks they agree.

Deliberate differences from our step, because they are what a plain PyTorch loop does: gradients are reset with
set_to_none (tch zeroes them), the loss is read back once per step (fit reads each head's loss too), and on CUDA
AdamW and clip_grad_norm_ use PyTorch's default multi-tensor (foreach) kernels.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
STEM, HEAD = 32, 1280
# (expand ratio, kernel, stride, out channels, repeats): EfficientNet-B0 at width and depth 1.0, also Lite0's.
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
# trainer::train::TrainConfig::default() and trainer::torch::BN_MOMENTUM.
HPARAMS = dict(lr=2e-3, head_lr_mult=5.0, weight_decay=0.02, label_smoothing=0.1, clip_grad_norm=2.0, dropout=0.2,
               drop_path=0.1, bn_eps=1e-3, bn_momentum=0.01)


def conv_bn(cin, cout, k, s, groups, act):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=HPARAMS["bn_eps"], momentum=HPARAMS["bn_momentum"])]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, ch, squeeze):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(ch, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, ch, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand, k, s, se, act, drop_path):
        super().__init__()
        mid = cin * expand
        layers = [conv_bn(cin, mid, 1, 1, 1, act)] if expand != 1 else []
        layers.append(conv_bn(mid, mid, k, s, mid, act))
        if se:
            layers.append(SqueezeExcite(mid, max(1, cin // 4)))
        layers.append(conv_bn(mid, cout, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x):
        y = self.block(x)
        if not self.residual:
            return y
        if self.training and self.drop_path > 0:
            # torchvision.ops.stochastic_depth(mode="row").
            keep = 1.0 - self.drop_path
            y = y * torch.empty([y.shape[0], 1, 1, 1], dtype=y.dtype, device=y.device).bernoulli_(keep).div_(keep)
        return y + x


class EffNet(nn.Module):
    def __init__(self, arch, heads, classes):
        super().__init__()
        b0 = arch == "b0"
        act = nn.SiLU if b0 else nn.ReLU6
        specs, cin = [], STEM
        for expand, k, s, cout, repeats in STAGES:
            for r in range(repeats):
                specs.append((cin, cout, expand, k, s if r == 0 else 1))
                cin = cout
        blocks = [MBConv(ci, co, e, k, s, b0, act, HPARAMS["drop_path"] * i / len(specs))
                  for i, (ci, co, e, k, s) in enumerate(specs)]
        self.features = nn.Sequential(conv_bn(3, STEM, 3, 2, 1, act), *blocks, conv_bn(cin, HEAD, 1, 1, 1, act))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(HPARAMS["dropout"])
        self.heads = nn.ModuleList(nn.Linear(HEAD, classes) for _ in range(heads))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                r = 1.0 / m.out_features ** 0.5
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        f = torch.flatten(self.pool(self.features(x)), 1)
        return [h(self.dropout(f)) for h in self.heads]


def param_groups(model):
    """Our four optimizer groups: weight decay on conv and head weights only, heads at head_lr_mult × lr."""
    lr, wd = HPARAMS["lr"], HPARAMS["weight_decay"]
    groups = {k: [] for k in ("bb_decay", "bb_no_decay", "head_decay", "head_no_decay")}
    for name, p in model.named_parameters():
        head = name.startswith("heads.")
        decay = p.ndim > 1  # conv and linear weights; BN affine parameters and biases are 1-d
        groups[("head_" if head else "bb_") + ("decay" if decay else "no_decay")].append(p)
    hl = lr * HPARAMS["head_lr_mult"]
    return [dict(params=groups["bb_decay"], lr=lr, weight_decay=wd),
            dict(params=groups["bb_no_decay"], lr=lr, weight_decay=0.0),
            dict(params=groups["head_decay"], lr=hl, weight_decay=wd),
            dict(params=groups["head_no_decay"], lr=hl, weight_decay=0.0)]


def synthetic_targets(batch, heads, classes):
    """Identical to the Rust bench: class (7 i + 3 h) mod classes, every tenth image unlabelled."""
    return [torch.tensor([IGNORE if i % 10 == 9 else (7 * i + 3 * h) % classes for i in range(batch)])
            for h in range(heads)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=["lite0", "b0"], default="lite0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--res", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps the default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="fp16 autocast + GradScaler (CUDA only)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--heads", type=int, default=5)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.amp and device.type != "cuda":
        sys.exit("--amp needs --device cuda (fit uses fp16 autocast on CUDA only)")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device")
    if a.batch < 1 or a.res < 32 or a.steps < 1 or a.heads < 1 or a.classes < 1:
        sys.exit("--batch, --steps, --heads and --classes must be positive and --res at least 32")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = a.cudnn_benchmark
    torch.manual_seed(a.seed)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format

    model = EffNet(a.arch, a.heads, a.classes).to(device, memory_format=fmt).train()
    opt = torch.optim.AdamW(param_groups(model), lr=HPARAMS["lr"], weight_decay=HPARAMS["weight_decay"])
    scaler = torch.amp.GradScaler("cuda", init_scale=65536.0, growth_interval=2000, enabled=a.amp)
    params = [p for p in model.parameters()]
    images = torch.randn(a.batch, 3, a.res, a.res)  # on the host, copied every step like fit's batches
    targets = synthetic_targets(a.batch, a.heads, a.classes)

    def step():
        xs = images.to(device).contiguous(memory_format=fmt)
        ts = [t.to(device) for t in targets]
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16, enabled=a.amp):
            logits = model(xs)
        loss = sum(F.cross_entropy(l.float(), t, ignore_index=IGNORE, label_smoothing=HPARAMS["label_smoothing"])
                   for l, t in zip(logits, ts))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, HPARAMS["clip_grad_norm"])
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        loss.item()  # the usual per-step logging read-back
        return not (a.amp and scaler.get_scale() < before)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(a.warmup):
        step()
    sync()
    ms, skipped = [], 0
    for _ in range(a.steps):
        t0 = time.perf_counter()
        skipped += not step()
        sync()
        ms.append((time.perf_counter() - t0) * 1e3)

    median = statistics.median(ms)
    out = dict(impl=f"pytorch {torch.__version__}", arch=a.arch, device=a.device, batch=a.batch, res=a.res,
               threads=torch.get_num_threads(), amp=a.amp, channels_last=a.channels_last,
               cudnn_benchmark=a.cudnn_benchmark, heads=a.heads, classes=a.classes, warmup=a.warmup, steps=a.steps,
               skipped_steps=skipped, loss_scale=scaler.get_scale() if a.amp else 1.0, median_ms=median,
               mean_ms=statistics.fmean(ms), min_ms=min(ms), max_ms=max(ms), images_per_s=a.batch / (median / 1e3),
               hparams=HPARAMS)
    if a.json:
        print(json.dumps(out))
    else:
        print(f"pytorch {a.arch} {a.device} batch {a.batch} res {a.res} threads {out['threads']} amp {a.amp} "
              f"channels_last {a.channels_last}: {median:.1f} ms/step (median of {len(ms)}, mean {out['mean_ms']:.1f}),"
              f" {out['images_per_s']:.1f} images/s, {skipped} skipped")


if __name__ == "__main__":
    main()
