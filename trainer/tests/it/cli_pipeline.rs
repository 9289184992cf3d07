//! The ML engineer's path through the real `trainer` binary on a small slice of the real catalogue: curate → train
//! (2 epochs, 64×64, from the ImageNet Lite0 weights) → eval → audit with planted flips → package → ship. The loss
//! must fall, each step must leave its artefacts, and the packaged ONNX must match the tch model (≤ 1e-4).

use crate::common::{AttrdNode, fashion_dir, free_port, lite0_checkpoint};

use std::path::Path;
use std::process::Command;

fn trainer(args: &[&str], cwd: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_trainer")).args(args).current_dir(cwd).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "trainer {args:?} failed:\n{err}");
    err
}

const SCHEMA: &str = r#"
[source]
id_column = "id"
image_column = "file"
[duplicates]
near = false
[split]
seed = 3
train = 0.7
val = 0.15
test = 0.15
group_by = "exact"
stratify = "masterCategory"
[[attribute]]
name = "masterCategory"
min_count = 10
[[attribute]]
name = "gender"
min_count = 10
"#;

const TRAIN: &str = r#"
arch = "efficientnet-lite0"
epochs = 2
batch_size = 32
lr = 0.001
warmup_epochs = 0.3
device = "cpu"
early_stopping_patience = 0
[input]
width = 64
height = 64
"#;

#[test]
fn curate_train_eval_and_audit_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let data = fashion_dir();
    // The first 600 catalogue rows, as a labels file of their own.
    let text = std::fs::read_to_string(data.join("labels.csv")).unwrap();
    let head: Vec<&str> = text.lines().take(601).collect();
    std::fs::write(w.join("labels.csv"), head.join("\n") + "\n").unwrap();
    std::fs::write(w.join("schema.toml"), SCHEMA).unwrap();
    std::fs::write(w.join("train.toml"), TRAIN).unwrap();
    let data_s = data.to_str().unwrap();

    let out = trainer(
        &["curate", "--schema", "schema.toml", "--labels", "labels.csv", "--images", data_s, "--out", "ds", "--quiet"],
        w,
    );
    assert!(w.join("ds/dataset.json").is_file(), "{out}");
    let lite0 = lite0_checkpoint();
    trainer(&["import-weights", lite0.to_str().unwrap(), "-o", "lite0.safetensors"], w);
    let out = trainer(
        &["train", "--dataset", "ds", "--config", "train.toml", "--init", "lite0.safetensors", "--out", "run"],
        w,
    );
    assert!(out.contains("best validation mean macro-F1"), "{out}");
    let csv = std::fs::read_to_string(w.join("run/metrics.csv")).unwrap();
    let losses: Vec<f64> = csv.lines().skip(1).map(|l| l.split(',').nth(2).unwrap().parse().unwrap()).collect();
    assert_eq!(losses.len(), 2, "{csv}");
    // Fresh heads start at zero, so the untrained loss is the sum of ln(classes) over the heads; two short epochs
    // must end well below it. (Epoch 1 against epoch 2 is no signal: both sit within a few percent after warm-up.)
    let ds: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(w.join("ds/dataset.json")).unwrap()).unwrap();
    let untrained: f64 =
        ds["attributes"].as_array().unwrap().iter().map(|a| (a["classes"].as_array().unwrap().len() as f64).ln()).sum();
    eprintln!("training losses {losses:?}, untrained {untrained}");
    assert!(losses[1] < 0.8 * untrained, "the training loss must fall well below {untrained}: {losses:?}");
    for f in ["best.safetensors", "last.safetensors", "run.json", "loss.png", "val_f1.png"] {
        assert!(w.join("run").join(f).is_file(), "{f} missing");
    }

    let out = trainer(&["eval", "--run", "run", "--dataset", "ds", "--out", "eval", "--device", "cpu"], w);
    assert!(out.contains("masterCategory") && out.contains("gender"), "{out}");
    let html = std::fs::read_to_string(w.join("eval/report.html")).unwrap();
    assert!(html.contains("masterCategory") && html.contains("data:image/png;base64,"));
    let cal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.join("eval/calibration.json")).unwrap()).unwrap();
    assert!(cal.to_string().contains("temperature"), "{cal}");

    let out = trainer(
        &[
            "audit",
            "--dataset",
            "ds",
            "--init",
            "lite0.safetensors",
            "--config",
            "train.toml",
            "--folds",
            "3",
            "--flip-rate",
            "0.05",
            "--device",
            "cpu",
            "--out",
            "audit",
        ],
        w,
    );
    assert!(out.contains("planted flips: precision"), "{out}");
    let issues = std::fs::read_to_string(w.join("audit/label_issues.csv")).unwrap();
    assert!(issues.starts_with("rank,head,id,image,given,suggested"), "{issues}");
    assert!(issues.lines().count() > 1, "some candidates are ranked");
    let audit: serde_json::Value = serde_json::from_slice(&std::fs::read(w.join("audit/audit.json")).unwrap()).unwrap();
    let recall = audit["heads"][0]["planted"]["recall"].as_f64().unwrap();
    assert!(recall > 0.3, "the audit finds a good part of the planted flips: {audit}");

    // Package: ONNX export with the calibration, signed, with a golden set from the test split.
    trainer(&["keygen", "key"], w);
    let out = trainer(
        &[
            "package",
            "--run",
            "run",
            "--calibration",
            "eval/calibration.json",
            "--dataset",
            "ds",
            "--name",
            "fashion-test",
            "--version",
            "0.1.0",
            "--signing-key",
            "key.key",
            "--golden",
            "4",
            "-o",
            "bundle",
        ],
        w,
    );
    assert!(out.contains("signed"), "{out}");
    let b = attrd::bundle::Bundle::open(w.join("bundle")).unwrap();
    let keys = attrd::bundle::TrustedKeys::from_files([w.join("key.pub")]).unwrap();
    assert!(matches!(b.verify(&keys), Ok(attrd::bundle::SignatureStatus::Verified { .. })));
    let cal: trainer::torch::report::Calibration =
        serde_json::from_slice(&std::fs::read(w.join("eval/calibration.json")).unwrap()).unwrap();
    for (h, c) in b.manifest().heads.iter().zip(&cal.heads) {
        assert_eq!((h.name.as_str(), h.temperature), (c.name.as_str(), c.temperature as f32));
        assert_eq!(h.thresholds, c.thresholds);
    }
    let ds = trainer::curate::Dataset::load(&w.join("ds")).unwrap();
    assert_eq!(b.manifest().training_data.fingerprint, ds.fingerprint);
    // The bundle passes its own golden set in real ONNX Runtime, as attrd checks before activating it.
    let (engine, report) = attrd::models::load_and_test(&b, &attrd::engine::EngineConfig::cpu()).unwrap();
    assert_eq!(report.golden_items, 4);

    // Export parity: ORT's logits equal the tch model's on the same preprocessed test images (≤ 1e-4).
    let (state, _vs, model) = trainer::torch::fit::load_run(&w.join("run"), tch::Device::Cpu).unwrap();
    let pre = trainer::train::data::preprocessor(state.config.input_spec()).unwrap();
    let items = trainer::train::items_of(&ds, trainer::curate::Split::Test, Some(8));
    let (examples, _) = trainer::train::data::load_examples(items, &pre, |_| {});
    let tch_logits =
        trainer::torch::fit::predict_logits(&model, &examples, &state.heads, &pre, tch::Device::Cpu, 8, false, false)
            .unwrap();
    let idx: Vec<usize> = (0..examples.len()).collect();
    let batch = trainer::train::data::make_batch(&examples, &idx, &state.heads, &pre, None);
    let s = pre.spec();
    let arr = ndarray::Array4::from_shape_vec((batch.n, 3, s.height as usize, s.width as usize), batch.images).unwrap();
    let ort = engine.infer_blocking(arr).unwrap();
    for (t, o) in tch_logits.iter().zip(&ort.logits) {
        let d = t.iter().zip(o.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = t.iter().fold(1f32, |m, v| m.max(v.abs()));
        // fp32 sums in a different order (MLAS vs libtorch kernels): the difference grows with the logits' size.
        assert!(d <= 1e-5 * scale.max(10.0), "ORT and tch logits differ by {d} (largest |logit| {scale})");
    }

    // A standalone export is the graph the bundle carries.
    trainer(&["export", "--run", "run", "-o", "model.onnx"], w);
    assert_eq!(std::fs::read(w.join("model.onnx")).unwrap(), std::fs::read(b.onnx_path()).unwrap());

    // Quantize: calibration, sensitivity, selection, the report; then an INT8 bundle whose golden set holds the fp32
    // references, which the INT8 model meets within the tolerance package derives.
    let out = trainer(
        &[
            "quantize",
            "--model",
            "model.onnx",
            "--run",
            "run",
            "--dataset",
            "ds",
            "--calibration-items",
            "32",
            "--sensitivity-items",
            "16",
            "--select-items",
            "0",
            "--max-f1-loss",
            "1.0",
            "--threads",
            "2",
            "-o",
            "model.int8.onnx",
        ],
        w,
    );
    assert!(out.contains("model.int8.quantize.md"), "{out}");
    let md = std::fs::read_to_string(w.join("model.int8.quantize.md")).unwrap();
    assert!(md.contains("INT8 macro-F1") && md.contains("integer kernels") && md.contains("| gender |"), "{md}");
    let q: trainer::quantize::QuantReport =
        serde_json::from_slice(&std::fs::read(w.join("model.int8.quantize.json")).unwrap()).unwrap();
    assert!(q.integer_kernels > 20, "ORT runs integer kernels: {:?}", q.optimized_ops);
    assert_eq!(q.sensitivity.len(), q.qdq.nodes.values().sum::<usize>() + q.kept_fp32.len());
    assert!(q.selection.last().unwrap().loss_points <= 1.0 || q.kept_fp32.len() == q.sensitivity.len());
    assert_eq!(q.test.len(), state.heads.len());
    assert!(q.int8_bytes * 2 < q.fp32_bytes, "{} vs {} bytes", q.int8_bytes, q.fp32_bytes);
    // An INT8 graph packaged as a signed bundle with 4 golden items.
    let package_int8 = |model: &str, name: &str, out: &str| {
        #[rustfmt::skip]
        let args = [
            "package", "--run", "run", "--calibration", "eval/calibration.json", "--dataset", "ds", "--model", model,
            "--name", name, "--version", "0.1.0", "--signing-key", "key.key", "--golden", "4", "-o", out,
        ];
        trainer(&args, w)
    };
    let out = package_int8("model.int8.onnx", "fashion-test-int8", "bundle-int8");
    assert!(out.contains("INT8 vs fp32 on the golden set"), "{out}");
    let b8 = attrd::bundle::Bundle::open(w.join("bundle-int8")).unwrap();
    assert_eq!(b8.manifest().precision, attrd::bundle::Precision::Int8);
    assert!(b8.verify(&keys).is_ok());
    let (g8, g) = (b8.golden().unwrap().unwrap(), b.golden().unwrap().unwrap());
    let fp32_refs = |set: &attrd::bundle::GoldenSet| -> Vec<_> {
        set.items.iter().map(|i| (i.sha256.clone(), i.probabilities.clone())).collect()
    };
    assert_eq!(fp32_refs(&g8), fp32_refs(&g), "fp32 references");
    // …and what the INT8 graph itself computed here, which a CPU must reproduce within the default 0.02.
    assert_eq!((g8.cpu_tolerance, g.cpu_tolerance), (Some(0.02), None));
    assert!(
        g8.items.iter().all(|i| i.cpu_probabilities.is_some()) && g.items.iter().all(|i| i.cpu_probabilities.is_none())
    );
    let (_, r8) = attrd::models::load_and_test(&b8, &attrd::engine::EngineConfig::cpu()).unwrap();
    assert!(r8.max_abs_diff > 0.0 && r8.max_abs_diff <= r8.tolerance.unwrap(), "{r8:?}");
    assert!(r8.cpu_max_abs_diff.unwrap() <= 1e-5, "{r8:?}");

    // Portability: with the default weight range the bundle gives the same bytes on an emulated x86 CPU whose
    // integer kernels saturate (AVX2 without VNNI) as on one whose kernels cannot; with unconstrained 8-bit weights
    // it does not, which is what makes the check worth having. scripts/check-int8-portability on the real attrd.
    if cfg!(target_arch = "x86_64") {
        #[rustfmt::skip]
        let args = [
            "quantize", "--model", "model.onnx", "--run", "run", "--dataset", "ds", "--calibration-items", "32",
            "--threads", "2", "--no-sensitivity", "--weight-range", "full", "-o", "model.full.onnx",
        ];
        trainer(&args, w);
        package_int8("model.full.onnx", "fashion-test-full", "bundle-full");
        let photos: Vec<std::path::PathBuf> =
            head.iter().skip(1).take(32).map(|l| data.join(l.split(',').nth(1).unwrap())).collect();
        let check = |bundle: &str| {
            let out = Command::new(crate::common::manifest_dir().join("../scripts/check-int8-portability"))
                .arg(w.join(bundle))
                .args(&photos)
                .env("ATTRD", crate::common::attrd_binary())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            (out.status.code(), text)
        };
        let (code, text) = check("bundle-int8");
        assert_eq!(code, Some(0), "{text}");
        let (code, text) = check("bundle-full");
        assert_eq!(code, Some(1), "unconstrained 8-bit weights should saturate somewhere: {text}");
        assert!(text.contains("give different results on an x86 CPU without VNNI"), "{text}");
        // attrd itself refuses the full-range bundle on such a CPU (the check above overrides that to see what it
        // would compute), and serves the safe one.
        let on_haswell = |bundle: &str| {
            Command::new("qemu-x86_64")
                .args(["-cpu", "Haswell"])
                .arg(crate::common::attrd_binary())
                .args(["infer", "--providers", "cpu", "--bundle"])
                .arg(w.join(bundle))
                .arg(&photos[0])
                .output()
                .unwrap()
        };
        let refused = on_haswell("bundle-full");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{stderr}");
        assert!(stderr.contains("--weight-range full") && stderr.contains("saturate"), "{stderr}");
        let served = on_haswell("bundle-int8");
        assert!(served.status.success(), "{}", String::from_utf8_lossy(&served.stderr));
        // Overriding that refusal does not let the full-range bundle through: its self-test fails on the outputs it
        // gave where it was packaged (a CPU with exact kernels), long before the fp32 tolerance would. The safe
        // bundle passes it on the same emulated CPU.
        let self_test = |bundle: &str| {
            let out = Command::new("qemu-x86_64")
                .args(["-cpu", "Haswell"])
                .arg(crate::common::attrd_binary())
                .args(["model", "test", "--providers", "cpu", "--allow-saturating-int8", "--trusted-key", "key.pub"])
                .arg(bundle)
                .current_dir(w)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            (out.status.success(), text)
        };
        let (ok, text) = self_test("bundle-full");
        assert!(!ok && text.contains("from the packaged CPU result"), "{text}");
        let (ok, text) = self_test("bundle-int8");
        assert!(ok && text.contains("golden set passed on cpu") && text.contains("packaged CPU result"), "{text}");
    }

    // Ship: atomically into a directory, and over MQTT to a real broker as a retained upload.
    let out = trainer(&["ship", "bundle", "--to-dir", "fleet"], w);
    assert!(w.join("fleet/fashion-test-0.1.0").is_dir(), "{out}");
    assert!(attrd::bundle::Bundle::open(w.join("fleet/fashion-test-0.1.0")).unwrap().verify(&keys).is_ok());
    let port = free_port();
    let mut broker = Command::new("/usr/sbin/mosquitto").args(["-p", &port.to_string()]).spawn().unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = trainer(&["ship", "bundle", "--mqtt", &format!("127.0.0.1:{port}")], w);
    assert!(out.contains("attrd/models/fashion-test"), "{out}");
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "attrd/models/fashion-test", "-C", "1", "-W", "10"])
        .output()
        .unwrap();
    let ann: attrd::mqtt::transfer::Announcement = serde_json::from_slice(&sub.stdout).unwrap();
    assert_eq!((ann.name.as_str(), ann.version.as_str()), ("fashion-test", "0.1.0"));
    assert!(ann.chunks.len() as u64 * u64::from(ann.chunk_size) >= ann.size);

    // End to end: a running attrd that trusts this key receives the INT8 bundle the trainer ships, verifies it,
    // passes its golden set and reports the new model on its model-state topic.
    let mut node = AttrdNode::start(port, &w.join("key.pub"));
    let out = trainer(&["ship", "bundle-int8", "--mqtt", &format!("127.0.0.1:{port}")], w);
    assert!(out.contains("attrd/models/fashion-test-int8"), "{out}");
    let state = node.wait_for_model_state(port, |v| {
        v["model"]["name"] == "fashion-test-int8" && v["transfer"]["status"] == "activated"
    });
    assert_eq!(state["model"]["version"], "0.1.0", "{state}");
    assert_eq!(state["model"]["precision"], "int8", "{state}");
    assert!(state["self_test"]["golden_items"].as_u64().unwrap() > 0, "{state}");
    assert!(state["self_test"]["cpu_max_abs_diff"].as_f64().unwrap() <= 1e-5, "{state}");
    drop(node);
    let _ = broker.kill();
    let _ = broker.wait();
}
