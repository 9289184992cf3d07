"""Python peer of `attrd bench` (P1): what an integrator writes today with onnxruntime + Pillow + paho-mqtt. The same
photos (read from disk), the same ONNX model, input spec and intra-op threads, the same batch size; each result as
JSON (attributes with top-k and accept/abstain, like attrd's) published at QoS 1 to the same local mosquitto; the
clock stops when the broker has acknowledged every result. No durable outbox: results only live in memory.

Usage: bench_e2e.py BUNDLE_DIR IMAGES_DIR LIMIT THREADS BATCH MQTT_PORT; prints one JSON line like `attrd bench --json`.
"""
import hashlib
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
import paho.mqtt as paho
import paho.mqtt.client as mqtt
from PIL import Image, ImageOps


def load_spec(bundle):
    m = json.load(open(os.path.join(bundle, "manifest.json")))
    spec = m["input"]
    if spec["resize"] != "letterbox" or spec["layout"] != "nchw" or spec["channel_order"] != "rgb":
        sys.exit(f"bench_e2e.py implements letterbox/nchw/rgb inputs only, not {spec}")
    return m, spec


def prepare(path, spec):
    data = open(path, "rb").read()
    sha = hashlib.sha256(data).hexdigest()
    im = Image.open(path)
    w, h = spec["width"], spec["height"]
    im.draft("RGB", (w, h))  # JPEG: let libjpeg decode at a reduced DCT scale when the photo is large
    im = ImageOps.exif_transpose(im).convert("RGB")
    s = min(w / im.width, h / im.height)
    nw, nh = max(1, round(im.width * s)), max(1, round(im.height * s))
    canvas = Image.new("RGB", (w, h), tuple(spec["fill"]))
    canvas.paste(im.resize((nw, nh), Image.BILINEAR), ((w - nw) // 2, (h - nh) // 2))
    a = (np.asarray(canvas, dtype=np.float32) / 255.0 - np.array(spec["mean"], np.float32)) / np.array(
        spec["std"], np.float32
    )
    return np.ascontiguousarray(a.transpose(2, 0, 1)), sha


def attributes(heads, outputs, i):
    out = {}
    for head in sorted(heads, key=lambda h: "applies_to" in h):
        logits = outputs[head["name"]][i] / head["temperature"]
        if head["kind"] == "single":
            e = np.exp(logits - logits.max())
            p = e / e.sum()
        else:
            p = 1.0 / (1.0 + np.exp(-logits))
        order = np.argsort(-p, kind="stable")
        topk = [{"value": head["classes"][c], "confidence": float(p[c])} for c in order[: head["top_k"]]]
        best = int(order[0])
        cond = head.get("applies_to")
        applies = cond is None or out.get(cond["attribute"], {}).get("value") in cond["values"]
        if applies:
            accepted = bool(p[best] >= head["thresholds"][best])
            out[head["name"]] = {"value": head["classes"][best], "confidence": float(p[best]), "accepted": accepted,
                                 "decision": "accepted" if accepted else "abstain", "topk": topk}
        else:
            out[head["name"]] = {"value": None, "confidence": 0.0, "accepted": False,
                                 "decision": "not_applicable", "topk": topk}
    return out


def main():
    bundle, images, limit, threads, batch, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
        int(sys.argv[5]), int(sys.argv[6])
    manifest, spec = load_spec(bundle)
    files = sorted(f for f in os.listdir(images) if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp")))[:limit]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # As attrd::engine::session_builder: ORT would otherwise quantize the layers a bundle keeps in fp32.
    so.add_session_config_entry("optimization.disable_specified_optimizers", "WeightBiasQuantization")
    sess = ort.InferenceSession(os.path.join(bundle, manifest["onnx"]["file"]), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pybench-{os.getpid()}")
    client.max_inflight_messages_set(64)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    model = {"name": manifest["name"], "version": manifest["version"], "precision": manifest["precision"],
             "execution_provider": "cpu"}

    start = time.perf_counter()
    pending = []
    for b in range(0, len(files), batch):
        chunk = files[b:b + batch]
        prepared = [prepare(os.path.join(images, f), spec) for f in chunk]
        x = np.stack([t for t, _ in prepared])
        outputs = dict(zip(names, sess.run(None, {manifest["input_name"]: x})))
        for i, f in enumerate(chunk):
            sku = os.path.splitext(f)[0]
            payload = {"schema_version": 1, "node": "pybench", "sku": sku,
                       "source": {"image": f, "image_sha256": prepared[i][1]}, "model": model,
                       "attributes": attributes(manifest["heads"], outputs, i)}
            pending.append(client.publish(f"attrd/pybench/results/{sku}", json.dumps(payload), qos=1))
    for info in pending:
        info.wait_for_publish(timeout=120)
    seconds = time.perf_counter() - start
    unacked = sum(not info.is_published() for info in pending)
    client.loop_stop()
    client.disconnect()
    print(json.dumps({"impl": "python", "images": len(files), "results": len(pending) - unacked, "unacked": unacked,
                      "threads": threads, "max_batch": batch, "seconds": seconds,
                      "images_per_s": len(files) / seconds, "onnxruntime": ort.__version__,
                      "pillow": Image.__version__, "paho_mqtt": paho.__version__}))
    sys.exit(1 if unacked else 0)


if __name__ == "__main__":
    main()
