"""ONNX Runtime's Python API on the same model, input tensor, batch and threads as benches/infer.rs (P2): a session
with graph optimisation level ALL (the engine's Level3) and intra_op_num_threads = T, timed around session.run.

Usage: bench_infer.py MODEL.onnx INPUT.f32 BATCH THREADS SECONDS [KEY=VALUE ...]; INPUT.f32 is the Rust bench's
--save-input (its first BATCH images are used). KEY=VALUE pairs are extra session config entries, for trying ONNX
Runtime's options (docs/benchmarks.md, "P3 on an Intel Xeon"). Prints one JSON line like the Rust bench.

For the levers tried in docs/benchmarks.md (not what attrd ships):
- BATCH "mixed:N" runs a fixed pseudo-random sequence of batch sizes 1..N, the way a daemon's batches vary with
  load; images/s then counts every image of the sequence.
- SESSIONS=N runs N sessions of THREADS threads side by side in this process, one Python thread each (ONNX
  Runtime releases the GIL while it runs), as attrd's `engine.sessions`; images/s then counts every batch of every
  session over the time taken.
- ORT_PROVIDER=openvino runs on the OpenVINO execution provider (the onnxruntime-openvino wheel on PYTHONPATH) on
  the CPU with THREADS threads, in fp32 precision for fp32 layers.
"""
import os
import random
import threading
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    model, raw, threads, seconds = sys.argv[1], sys.argv[2], int(sys.argv[4]), float(sys.argv[5])
    mixed = sys.argv[3].startswith("mixed:")
    batch = int(sys.argv[3].removeprefix("mixed:"))
    provider = os.environ.get("ORT_PROVIDER", "cpu")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # As attrd::engine::session_builder: ORT would otherwise quantize the layers a bundle keeps in fp32.
    so.add_session_config_entry("optimization.disable_specified_optimizers", "WeightBiasQuantization")
    so.intra_op_num_threads = threads
    extra = dict(kv.split("=", 1) for kv in sys.argv[6:])
    for k, v in extra.items():
        so.add_session_config_entry(k, v)
    if provider == "openvino":
        providers = [("OpenVINOExecutionProvider", {"device_type": "CPU", "num_of_threads": str(threads),
                                                    "precision": "FP32"})]
    elif provider == "cpu":
        providers = ["CPUExecutionProvider"]
    else:
        sys.exit(f"ORT_PROVIDER must be cpu or openvino, not {provider!r}")
    sess = ort.InferenceSession(model, so, providers=providers)
    wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if sess.get_providers()[0] != wanted:
        # ONNX Runtime falls back to the CPU silently when a provider is missing.
        sys.exit(f"asked for {provider}, got {sess.get_providers()}")
    inp = sess.get_inputs()[0]
    shape = [batch] + [int(d) for d in inp.shape[1:]]
    x = np.fromfile(raw, dtype="<f4", count=int(np.prod(shape))).reshape(shape)
    # Every batch size once first: some providers build per input shape on first sight.
    for b in range(1, batch + 1) if mixed else [batch] * 5:
        sess.run(None, {inp.name: x[:b]})
    extra_fields = {**({"session_config": extra} if extra else {}), **({"provider": provider} if provider != "cpu" else {})}
    sessions = int(os.environ.get("SESSIONS", "1"))
    if sessions < 1 or (sessions > 1 and mixed):
        sys.exit(f"SESSIONS must be at least 1, and 1 with mixed batches, not {sessions}")
    if sessions > 1:
        others = [ort.InferenceSession(model, so, providers=providers) for _ in range(sessions - 1)]
        for o in others:
            for _ in range(5):
                o.run(None, {inp.name: x})
        counts = [0] * sessions
        start = time.perf_counter()

        def caller(i, s):
            while time.perf_counter() - start < seconds or counts[i] < 10:
                s.run(None, {inp.name: x})
                counts[i] += 1

        callers = [threading.Thread(target=caller, args=(i, s)) for i, s in enumerate([sess] + others)]
        for c in callers:
            c.start()
        for c in callers:
            c.join()
        elapsed = time.perf_counter() - start
        print(json.dumps({"impl": "onnxruntime-python", "model": model, "batch": batch, "threads": threads,
                          "sessions": sessions, "runs": sum(counts), "images_per_s": batch * sum(counts) / elapsed,
                          "onnxruntime": ort.__version__, **extra_fields}))
        return
    if mixed:
        sizes = random.Random(1).choices(range(1, batch + 1), k=1000)
        images, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or images == 0:
            for b in sizes:
                sess.run(None, {inp.name: x[:b]})
            images += sum(sizes)
        print(json.dumps({"impl": "onnxruntime-python", "model": model, "batch": f"mixed:{batch}", "threads": threads,
                          "images_per_s": images / (time.perf_counter() - start), "onnxruntime": ort.__version__,
                          **extra_fields}))
        return
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
                      "onnxruntime": ort.__version__, **extra_fields}))


if __name__ == "__main__":
    main()
