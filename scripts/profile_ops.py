"""Where a model's CPU time goes, per operator type and per node, from ONNX Runtime's own profiler (docs/benchmarks.md,
"P3 on an Intel Xeon"): batch 1 of random input, session options as attrd::engine::session_builder (all graph
optimisations, WeightBiasQuantization off), `THREADS` intra-op threads, 50 warm-up runs then `RUNS` profiled ones.

    PYTHONPATH=.deps/ort .venv/bin/python scripts/profile_ops.py MODEL.onnx [THREADS] [RUNS]
    # e.g. the default model and its fp32 twin, one thread:
    PYTHONPATH=.deps/ort .venv/bin/python scripts/profile_ops.py models/fashion-lite0-int8/model.onnx 1
    PYTHONPATH=.deps/ort .venv/bin/python scripts/profile_ops.py .deps/fashion-model/bundle-fp32/model.onnx 1

Prints the mean milliseconds per run of each operator type and of the 25 slowest nodes. Profiling itself costs time,
so compare two models profiled the same way, not these numbers with the benches'.
"""
import collections
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    model = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    warmup = 50
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("optimization.disable_specified_optimizers", "WeightBiasQuantization")
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    inp = s.get_inputs()[0]
    x = np.random.default_rng(0).random((1, *[int(d) for d in inp.shape[1:]]), dtype=np.float32)
    for _ in range(warmup):
        s.run(None, {inp.name: x})
    start = time.perf_counter()
    for _ in range(runs):
        s.run(None, {inp.name: x})
    wall = (time.perf_counter() - start) / runs * 1e3
    events = json.load(open(s.end_profiling()))
    by_op, by_node = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            by_node[e["name"].removesuffix("_kernel_time")] += e["dur"]
    total = warmup + runs  # the profile covers the warm-up runs too
    print(f"{model}: {threads} thread(s), {wall:.3f} ms per run (profiling on)")
    for op, us in by_op.most_common():
        print(f"  {op:26s} {us / total / 1000:.3f} ms")
    print("  slowest nodes:")
    for node, us in by_node.most_common(25):
        print(f"    {us / total / 1000:.3f} ms  {node}")


if __name__ == "__main__":
    main()
