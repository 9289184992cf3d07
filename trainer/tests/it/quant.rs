//! INT8 QDQ quantization on real weights and real photos, through the real ONNX Runtime: the graph loads, ORT's
//! optimizer turns it into integer kernels, and predictions stay close to fp32, while a deliberately wrong
//! calibration visibly does not (so the closeness checks can fail).

use crate::common::{fashion_dir, lite0_checkpoint, manifest_dir};
use crate::ort_rt::{env, run, session};
use ndarray::{Array2, Array4, Axis, s};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use trainer::onnx::proto::ModelProto;
use trainer::onnx::quant::{self, ActivationType, CalibrationMethod, Calibrator, QuantError, WeightRange};
use trainer::onnx::{self, ExportOptions};
use trainer::weights::{self, ImportOptions};

/// `n` real catalogue photos, letterboxed to 128×96 with the trainer's default normalisation.
fn photos(n: usize) -> Array4<f32> {
    let cfg: trainer::train::TrainConfig =
        toml::from_str("[input]\nwidth = 96\nheight = 128\nresize = \"letterbox\"\n").expect("config");
    let pre = trainer::train::data::preprocessor(cfg.input_spec()).expect("preprocessor");
    let mut files: Vec<PathBuf> = std::fs::read_dir(fashion_dir().join("images"))
        .expect("images dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    let tensors: Vec<Vec<f32>> =
        files.iter().step_by(97).take(n).map(|p| pre.prepare_path(p).expect("real photo decodes")).collect();
    assert_eq!(tensors.len(), n);
    pre.batch(&tensors)
}

fn lite0_imagenet() -> ModelProto {
    let opts = ImportOptions { keep_classifier: true, ..Default::default() };
    let (backbone, _) = weights::import(&lite0_checkpoint(), &opts).expect("import real Lite0 weights");
    let head = onnx::classifier_head(&backbone, "imagenet").expect("classifier");
    onnx::export_effnet(&backbone, &[head], &ExportOptions::new(128, 96)).expect("export")
}

fn b0_real() -> ModelProto {
    let path = manifest_dir().join("../.deps/nude-classifier/best_efficientnet_b0.pth");
    assert!(path.is_file(), "{} missing: run ./scripts/setup first", path.display());
    let opts = ImportOptions { keep_classifier: true, ..Default::default() };
    let (backbone, _) = weights::import(&path, &opts).expect("import real B0 weights");
    let head = onnx::classifier_head(&backbone, "cls").expect("classifier");
    onnx::export_effnet(&backbone, &[head], &ExportOptions::new(128, 96)).expect("export")
}

/// Activation thresholds from running `model` on `images` with every activation exposed (both passes).
fn calibrate(model: &ModelProto, images: &Array4<f32>, method: CalibrationMethod) -> BTreeMap<String, f32> {
    let acts = quant::activation_tensors(model).expect("activations");
    let mut s = session(&quant::with_outputs(model, &acts).expect("probe model"));
    let mut cal = Calibrator::default();
    for pass in 0..2 {
        for chunk in images.axis_chunks_iter(Axis(0), 8) {
            let out = s
                .run(ort::inputs!["image" => ort::value::TensorRef::from_array_view(chunk).expect("tensor")])
                .expect("calibration run");
            for name in &acts {
                let (_, data) = out[name.as_str()].try_extract_tensor::<f32>().expect("f32 activation");
                if pass == 0 {
                    cal.observe_range(name, data);
                } else {
                    cal.observe_histogram(name, data);
                }
            }
        }
    }
    cal.thresholds(method)
}

fn all_nodes(model: &ModelProto) -> BTreeSet<String> {
    quant::quantizable_nodes(model).expect("nodes").into_iter().collect()
}

fn logits(model: &ModelProto, images: &Array4<f32>) -> Array2<f32> {
    run(&mut session(model), "image", images).remove(0).1
}

fn mean_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
    a.iter().zip(b.iter()).map(|(x, y)| f64::from((x - y).abs())).sum::<f64>() / a.len() as f64
}

fn top1_agreement(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
    let argmax = |r: ndarray::ArrayView1<'_, f32>| r.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map(|x| x.0);
    let same = a.axis_iter(Axis(0)).zip(b.axis_iter(Axis(0))).filter(|(x, y)| argmax(*x) == argmax(*y)).count();
    same as f64 / a.nrows() as f64
}

/// The operator counts of ONNX Runtime's optimized (Level 3) version of `model`.
fn optimized_ops(model: &ModelProto) -> BTreeMap<String, usize> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("opt.onnx");
    attrd::engine::session_builder(env())
        .expect("builder")
        .with_optimized_model_path(&path)
        .expect("optimized path")
        .commit_from_memory(&onnx::encode_model(model).expect("encode"))
        .expect("ORT accepts the QDQ model");
    if let Some(d) = std::env::var_os("QUANT_DEBUG_DIR") {
        let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        std::fs::copy(&path, PathBuf::from(&d).join(format!("opt-{n}.onnx"))).unwrap();
        std::fs::write(PathBuf::from(&d).join(format!("in-{n}.onnx")), onnx::encode_model(model).unwrap()).unwrap();
    }
    let optimized = ModelProto::decode(std::fs::read(&path).expect("optimized model").as_slice()).expect("decode");
    quant::op_counts(&optimized)
}

#[test]
fn lite0_int8_runs_integer_kernels_and_keeps_its_predictions() {
    let model = lite0_imagenet();
    // 24 photos calibrate, 96 others judge: fewer made the agreement figures swing by ±10 points between equally
    // good quantizations.
    let images = photos(120);
    let (calib, held_out) =
        (images.slice(s![..24, .., .., ..]).to_owned(), images.slice(s![24.., .., .., ..]).to_owned());
    let thresholds = calibrate(&model, &calib, CalibrationMethod::Percentile(99.999));
    let nodes = all_nodes(&model);
    let (int8, summary) = quant::quantize_qdq(&model, &nodes, &thresholds, ActivationType::U8).expect("quantize");
    assert!(quant::is_quantized(&int8) && !quant::is_quantized(&model));
    let convs = model.graph.as_ref().unwrap().node.iter().filter(|n| n.op_type == "Conv").count();
    assert_eq!(summary.nodes["Conv"], convs);
    assert_eq!(summary.weights, convs + 1, "every conv and the head");

    // ORT fuses the QDQ groups into integer kernels, one per convolution at least.
    let ops = optimized_ops(&int8);
    assert!(quant::integer_kernel_count(&ops) >= convs, "integer kernels in {ops:?}");
    assert!(!ops.contains_key("Conv"), "every Conv should have become an integer kernel: {ops:?}");

    assert!(ops.get("com.microsoft:QLinearAdd").is_some_and(|&n| n > 0), "residual adds in INT8: {ops:?}");
    // The ReLU6 clips fold into the convolutions and nothing is requantized between layers: the image is quantized
    // once on the way in and the heads' integer GEMM returns fp32.
    assert!(!ops.contains_key("Clip"), "ReLU6 left in fp32: {ops:?}");
    assert!(ops.get("QuantizeLinear").copied().unwrap_or(0) <= 1, "requantization between layers: {ops:?}");
    assert!(!ops.contains_key("DequantizeLinear"), "dequantization between layers: {ops:?}");

    // s8 activations (TensorRT's form: symmetric everywhere, the clips stay for TensorRT to fuse) still run mostly
    // on integer kernels on ORT's CPU and predict like fp32.
    let (s8, _) = quant::quantize_qdq(&model, &nodes, &thresholds, ActivationType::S8).expect("quantize s8");
    let s8_ops = optimized_ops(&s8);
    assert!(quant::integer_kernel_count(&s8_ops) > convs / 2, "s8 integer kernels in {s8_ops:?}");

    // Stored weights shrink to about a quarter.
    let (b32, b8) = (onnx::encode_model(&model).unwrap().len(), onnx::encode_model(&int8).unwrap().len());
    assert!(b8 * 3 < b32, "{b8} bytes INT8 vs {b32} fp32");

    // Predictions on photos the calibration never saw: ImageNet's 1000 classes on catalogue photos are a hard,
    // low-margin case, which is what makes the agreement meaningful.
    let (f, q) = (logits(&model, &held_out), logits(&int8, &held_out));
    assert!(q.iter().all(|v| v.is_finite()));
    let good = top1_agreement(&f, &q);
    let q_s8 = logits(&s8, &held_out);
    let s8_good = top1_agreement(&f, &q_s8);
    let (err, s8_err) = (mean_abs_diff(&f, &q), mean_abs_diff(&f, &q_s8));
    eprintln!(
        "held-out vs fp32: top-1 agreement u8 {good:.2}, s8 {s8_good:.2}; mean |Δlogit| u8 {err:.3}, s8 {s8_err:.3}"
    );
    assert!(good >= 0.55, "INT8 top-1 agrees with fp32 on {:.0}% of held-out photos", 100.0 * good);
    assert!(s8_good >= 0.55, "s8 INT8 top-1 agrees with fp32 on {:.0}% of held-out photos", 100.0 * s8_good);
    // The unsigned grid on ReLU6 outputs has twice the resolution of the symmetric one: it must show.
    assert!(err < s8_err, "u8 logits are off by {err:.3} on average, s8 by {s8_err:.3}");

    // The same graph with ranges 100× too small saturates everything: the checks above must be able to fail.
    let broken: BTreeMap<String, f32> = thresholds.iter().map(|(k, v)| (k.clone(), v / 100.0)).collect();
    let (bad, _) = quant::quantize_qdq(&model, &nodes, &broken, ActivationType::U8).expect("quantize");
    let bad_agreement = top1_agreement(&f, &logits(&bad, &held_out));
    assert!(bad_agreement < good - 0.3, "broken calibration agrees {bad_agreement:.2} vs {good:.2}");
}

/// B0's graph (SiLU, squeeze-excite) quantizes completely and ORT runs it on integer kernels. How far its outputs
/// move is B0's known weak spot and what `trainer quantize`'s sensitivity analysis handles; here only the mechanics
/// are checked.
#[test]
fn b0_squeeze_excite_graph_quantizes_onto_integer_kernels() {
    let model = b0_real();
    let images = photos(16);
    let thresholds = calibrate(&model, &images, CalibrationMethod::Percentile(99.999));
    let all = all_nodes(&model);
    let (int8, summary) = quant::quantize_qdq(&model, &all, &thresholds, ActivationType::U8).expect("quantize");
    assert!(summary.nodes["GlobalAveragePool"] > 16, "SE pools are quantized too: {:?}", summary.nodes);
    let convs = model.graph.as_ref().unwrap().node.iter().filter(|n| n.op_type == "Conv").count();
    let ops = optimized_ops(&int8);
    assert!(quant::integer_kernel_count(&ops) > convs, "integer kernels in {ops:?}");
    assert!(logits(&int8, &images).iter().all(|v| v.is_finite()));
}

#[test]
fn kept_layers_stay_fp32_and_bad_requests_are_refused() {
    let model = lite0_imagenet();
    let images = photos(8);
    let thresholds = calibrate(&model, &images, CalibrationMethod::MinMax);
    let mut nodes = all_nodes(&model);
    assert!(nodes.remove("stem.conv") && nodes.remove("heads.imagenet"));
    let (int8, summary) = quant::quantize_qdq(&model, &nodes, &thresholds, ActivationType::U8).expect("quantize");
    let inits: BTreeSet<&str> = int8.graph.as_ref().unwrap().initializer.iter().map(|t| t.name.as_str()).collect();
    assert!(inits.contains("stem.conv.weight") && !inits.contains("stem.conv.weight_quantized"));
    assert!(inits.contains("heads.imagenet.weight") && inits.contains("blocks.0.dw.conv.weight_quantized"));
    assert!(!summary.nodes.contains_key("Gemm"));
    assert!(logits(&int8, &images).iter().all(|v| v.is_finite()));

    // A kept layer between two quantized ones reads a DequantizeLinear and feeds a QuantizeLinear; ONNX Runtime's
    // WeightBiasQuantization would quantize its weights per tensor behind our back. The engine's sessions must run
    // it in fp32, as the sensitivity analysis measured it.
    let fp32_convs = |ops: &BTreeMap<String, usize>| {
        ops.get("Conv").copied().unwrap_or(0) + ops.get("com.microsoft.nchwc:Conv").copied().unwrap_or(0)
    };
    let mut all_but_one = all_nodes(&model);
    assert!(all_but_one.remove("blocks.0.dw.conv"));
    let (sandwiched, _) = quant::quantize_qdq(&model, &all_but_one, &thresholds, ActivationType::U8).expect("quantize");
    let ops = optimized_ops(&sandwiched);
    assert_eq!(fp32_convs(&ops), 1, "blocks.0.dw.conv stays fp32: {ops:?}");

    // Weight range: 8 bits by default with every i16 pair of a 1×1 conv within 128, 7 bits (±63) or unconstrained
    // 8 bits on request.
    let weight = |m: &ModelProto, name: &str| -> Vec<i8> {
        let w = m.graph.as_ref().unwrap().initializer.iter().find(|t| t.name == format!("{name}.weight_quantized"));
        w.expect("quantized weight").raw_data.iter().map(|&b| b as i8).collect()
    };
    let widest = |q: &[i8]| q.iter().map(|v| v.unsigned_abs()).max().unwrap();
    let widest_pair = |q: &[i8]| q.chunks(2).map(|p| p.iter().map(|v| u32::from(v.unsigned_abs())).sum::<u32>()).max();
    let all = all_nodes(&model);
    let (safe, _) = quant::quantize_qdq(&model, &all, &thresholds, ActivationType::U8).expect("safe weights");
    let (reduced, _) =
        quant::quantize_qdq_with(&model, &all, &thresholds, ActivationType::U8, WeightRange::Reduced).expect("7-bit");
    let (full, _) =
        quant::quantize_qdq_with(&model, &all, &thresholds, ActivationType::U8, WeightRange::Full).expect("8-bit");
    // [24, 96, 1, 1]: rows of 96 input channels, so chunks of 2 are exactly the pairs `vpmaddubsw` adds.
    let project = "blocks.1.project.conv";
    assert_eq!(widest(&weight(&safe, "blocks.1.dw.conv")), 127, "depthwise kernels take the full range");
    assert_eq!(widest(&weight(&safe, project)), 127);
    assert!(widest_pair(&weight(&safe, project)).unwrap() <= 128);
    assert!(widest_pair(&weight(&full, project)).unwrap() > 128, "the pair limit is not vacuous on real weights");
    assert_eq!(widest(&weight(&reduced, "blocks.1.dw.conv")), 63);
    assert_eq!(widest(&weight(&reduced, project)), 63);
    // The range travels with the model, for the daemon's check (attrd::engine::INT8_WEIGHT_RANGE_KEY).
    let range_of = |m: &ModelProto| {
        let e = m.metadata_props.iter().find(|p| p.key == attrd::engine::INT8_WEIGHT_RANGE_KEY);
        e.map(|p| p.value.clone())
    };
    assert_eq!(range_of(&safe).as_deref(), Some("safe"));
    assert_eq!(range_of(&full).as_deref(), Some("full"));
    assert_eq!(range_of(&reduced).as_deref(), Some("reduced"));
    assert_eq!(range_of(&model), None);
    // What the range buys: logits closer to fp32 than 7-bit weights give, on the same activation grid.
    let f = logits(&model, &images);
    let (safe_err, reduced_err) =
        (mean_abs_diff(&f, &logits(&safe, &images)), mean_abs_diff(&f, &logits(&reduced, &images)));
    assert!(safe_err < reduced_err, "safe weights move logits by {safe_err:.3}, 7-bit ones by {reduced_err:.3}");

    let one: BTreeSet<String> = ["no.such.node".to_string()].into();
    assert!(
        matches!(quant::quantize_qdq(&model, &one, &thresholds, ActivationType::U8), Err(QuantError::UnknownNode(n)) if n == "no.such.node")
    );
    let mut partial = thresholds.clone();
    partial.remove("blocks.2.add.out");
    let err = quant::quantize_qdq(&model, &all_nodes(&model), &partial, ActivationType::U8).unwrap_err();
    assert!(matches!(&err, QuantError::MissingRange(t) if t == "blocks.2.add.out"), "{err}");
}
