"""Where a model's CPU time goes, per operator type and per node, from ONNX Runtime's own profiler (docs/benchmarks.md,
"P3 on an Intel Xeon"): a batch (default 1) of random input, session options as attrd::engine::session_builder (all graph
optimisations, WeightBiasQuantization off), `THREADS` intra-op threads, 50 warm-up runs then `RUNS` profiled ones.

    PYTHONPATH=.deps/ort .venv/bin/python scripts/profile_ops.py MODEL.onnx [THREADS] [RUNS] [BATCH]
    # e.g. the default model and its fp32 twin, one thread:
    PYTHONPATH=.deps/ort .venv/bin/python scripts/profile_ops.py models/fashion-lite0-int8/model.onnx 1
    PYTHONPATH=.deps/ort .venv/bin/python scripts/profile_ops.py .deps/fashion-model/bundle-fp32/model.onnx 1

Prints the mean milliseconds per run of each operator type, of each kind of layer (stem, expand, depthwise, project,
head; by node name) and of the 25 slowest nodes. Profiling itself costs time,
so compare two models profiled the same way, not these numbers with the benches'.
"""
import collections
import json
import os
import re
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort


def layer_kind(node: str, op: str) -> str:
    """Node names start with the module (`stem.`, `blocks.3.dw.`, `head.`) in
    both the fp32 graph and the INT8 one, so the two can be compared kind by kind; anything else by operator."""
    m = re.match(r"(stem|head)\.|blocks\.\d+\.(expand|dw|project|se)\.", node)
    if m:
        return m.group(1) or m.group(2)
    return "other: " + op


def main() -> None:
    model = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    warmup = 50
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("optimization.disable_specified_optimizers", "WeightBiasQuantization")
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    inp = s.get_inputs()[0]
    x = np.random.default_rng(0).random((batch, *[int(d) for d in inp.shape[1:]]), dtype=np.float32)
    for _ in range(warmup):
        s.run(None, {inp.name: x})
    start = time.perf_counter()
    for _ in range(runs):
        s.run(None, {inp.name: x})
    wall = (time.perf_counter() - start) / runs * 1e3
    events = json.load(open(s.end_profiling()))
    by_op, by_node, by_kind = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            by_node[e["name"].removesuffix("_kernel_time")] += e["dur"]
            by_kind[layer_kind(e["name"], e["args"]["op_name"])] += e["dur"]
    total = warmup + runs  # the profile covers the warm-up runs too
    print(f"{model}: batch {batch}, {threads} thread(s), {wall:.3f} ms per run (profiling on)")
    for op, us in by_op.most_common():
        print(f"  {op:26s} {us / total / 1000:.3f} ms")
    print("  by layer kind:")
    for kind, us in by_kind.most_common():
        print(f"  {kind:26s} {us / total / 1000:.3f} ms")
    print("  slowest nodes:")
    for node, us in by_node.most_common(25):
        print(f"    {us / total / 1000:.3f} ms  {node}")


if __name__ == "__main__":
    main()
