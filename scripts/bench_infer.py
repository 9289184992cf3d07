"""ONNX Runtime's Python API on the same model, input tensor, batch and threads as benches/infer.rs (P2): a session
with graph optimisation level ALL (the engine's Level3) and intra_op_num_threads = T, timed around session.run.

Usage: bench_infer.py MODEL.onnx INPUT.f32 BATCH THREADS SECONDS [KEY=VALUE ...]; INPUT.f32 is the Rust bench's
--save-input (its first BATCH images are used). KEY=VALUE pairs are extra session config entries, for trying ONNX
Runtime's options (docs/benchmarks.md, "P3 on an Intel Xeon"). Prints one JSON line like the Rust bench.
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    model, raw, batch, threads, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # As attrd::engine::session_builder: ORT would otherwise quantize the layers a bundle keeps in fp32.
    so.add_session_config_entry("optimization.disable_specified_optimizers", "WeightBiasQuantization")
    so.intra_op_num_threads = threads
    extra = dict(kv.split("=", 1) for kv in sys.argv[6:])
    for k, v in extra.items():
        so.add_session_config_entry(k, v)
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [batch] + [int(d) for d in inp.shape[1:]]
    x = np.fromfile(raw, dtype="<f4", count=int(np.prod(shape))).reshape(shape)
    for _ in range(5):
        sess.run(None, {inp.name: x})
    ms = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(ms) < 10:
        t = time.perf_counter()
        sess.run(None, {inp.name: x})
        ms.append((time.perf_counter() - t) * 1e3)
    ms.sort()
    q = lambda p: ms[round((len(ms) - 1) * p)]
    print(json.dumps({"impl": "onnxruntime-python", "model": model, "batch": batch, "threads": threads, "runs": len(ms),
                      "median_ms": q(0.5), "p90_ms": q(0.9), "images_per_s": batch * 1e3 / q(0.5),
                      "onnxruntime": ort.__version__, **({"session_config": extra} if extra else {})}))


if __name__ == "__main__":
    main()
