"""Pillow peers of benches/preprocess.rs (P5): the same photo to the same 224x224 ImageNet tensor (resize the short
side to 256 with bicubic, centre crop 224, normalise, CHW float32), from the in-memory file.

  draft: Image.draft() first, so libjpeg decodes at a DCT-reduced size (what a careful Python service does)
  full:  a plain full-resolution decode, then the same resize (what most Python services do)

Usage: bench_preprocess.py IMAGE ITERATIONS {draft,full}; prints one JSON line like the Rust bench.
"""
import io
import json
import sys
import time

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SIZE, CROP = 224, 0.875


def prepare(data: bytes, draft: bool) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    short = round(SIZE / CROP)
    w, h = im.size
    scale = short / min(w, h)
    target = (max(SIZE, round(w * scale)), max(SIZE, round(h * scale)))
    if draft:
        im.draft("RGB", target)
    im = im.convert("RGB").resize(target, Image.BICUBIC)
    left, top = (target[0] - SIZE) // 2, (target[1] - SIZE) // 2
    im = im.crop((left, top, left + SIZE, top + SIZE))
    a = (np.asarray(im, dtype=np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def main() -> None:
    path, iterations, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    data = open(path, "rb").read()
    for _ in range(3):
        prepare(data, mode == "draft")
    ms = []
    for _ in range(iterations):
        t = time.perf_counter()
        prepare(data, mode == "draft")
        ms.append((time.perf_counter() - t) * 1e3)
    ms.sort()
    q = lambda p: ms[round((len(ms) - 1) * p)]
    with Image.open(path) as im:
        w, h = im.size
    print(json.dumps({"impl": f"pillow-{mode}", "image": path, "width": w, "height": h, "iterations": iterations,
                      "median_ms": q(0.5), "p90_ms": q(0.9), "pillow": Image.__version__}))


if __name__ == "__main__":
    main()
