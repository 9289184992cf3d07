//! Bundles the trainer writes, as the daemon's model store sees them: a model that produces NaN is refused and the
//! previous one keeps serving.

use attrd::bundle::{self, Bundle, HeadKind, Manifest, NewBundle, Precision, TrainingData, TrustedKeys};
use attrd::engine::EngineConfig;
use attrd::models::{ModelError, ModelStore};
use attrd::preprocess::InputSpec;
use ed25519_dalek::SigningKey;
use std::path::Path;
use trainer::effnet::Arch;
use trainer::onnx::proto::TensorProto;
use trainer::onnx::{ExportOptions, export_effnet, write_model};
use trainer::weights::{Backbone, LinearHead, Tensor};

fn head(classes: usize) -> LinearHead {
    let w: Vec<f32> = (0..classes * 1280).map(|i| ((i * 7919 % 101) as f32 - 50.0) * 1e-3).collect();
    LinearHead {
        name: "colour".into(),
        weight: Tensor::new(vec![classes, 1280], w),
        bias: Tensor::new(vec![classes], vec![0.0; classes]),
    }
}

/// Writes a signed bundle around a small random Lite0; `poison` turns the head's bias into NaN after export, the way
/// a broken conversion or quantization would.
fn write_bundle(dir: &Path, version: &str, key: &SigningKey, poison: bool) -> Bundle {
    let backbone = Backbone::random(Arch::Lite0, 7);
    let h = head(3);
    let mut model = export_effnet(&backbone, std::slice::from_ref(&h), &ExportOptions::new(64, 64)).unwrap();
    if poison {
        let graph = model.graph.as_mut().unwrap();
        let bias = graph.initializer.iter_mut().find(|t| t.name == "heads.colour.bias").expect("head bias initializer");
        *bias = TensorProto::from_f32("heads.colour.bias", &[3], &[f32::NAN; 3]);
    }
    let tmp = tempfile::tempdir().unwrap();
    let onnx = tmp.path().join("model.onnx");
    write_model(&model, &onnx).unwrap();
    let manifest = Manifest {
        schema_version: bundle::SCHEMA_VERSION,
        name: "colour".into(),
        version: version.parse().unwrap(),
        created_at: time::OffsetDateTime::now_utc(),
        description: String::new(),
        architecture: Arch::Lite0.to_string(),
        precision: Precision::Fp32,
        training_data: TrainingData { fingerprint: "none".into(), description: String::new() },
        input: InputSpec::imagenet(64, 64),
        input_name: "image".into(),
        heads: vec![bundle::Head {
            name: "colour".into(),
            kind: HeadKind::Single,
            classes: vec!["red".into(), "green".into(), "blue".into()],
            applies_to: None,
            temperature: 1.0,
            thresholds: vec![0.5; 3],
            top_k: 3,
        }],
        onnx: bundle::FileRef { file: String::new(), sha256: "0".repeat(64) },
        golden: None,
        evaluation: None,
    };
    bundle::write(&dir.join(version), NewBundle { manifest, onnx: &onnx, golden: None, signing_key: Some(key) })
        .unwrap()
}

#[test]
fn a_nan_producing_bundle_is_refused_and_the_old_model_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[5; 32]);
    let store = ModelStore::open(tmp.path().join("models"), TrustedKeys::new([key.verifying_key()]), false).unwrap();
    let cfg = EngineConfig::cpu();
    let good = write_bundle(tmp.path(), "1.0.0", &key, false);
    store.install(good.dir()).unwrap();
    store.activate("colour-1.0.0", &cfg).unwrap();

    let bad = write_bundle(tmp.path(), "1.0.1", &key, true);
    store.install(bad.dir()).unwrap();
    let err = store.activate("colour-1.0.1", &cfg).unwrap_err();
    assert!(matches!(err, ModelError::SelfTest { .. }), "{err}");
    assert!(err.to_string().contains("non-finite") || err.to_string().contains("NaN"), "{err}");
    assert_eq!(store.active().unwrap().label(), "colour@1.0.0");
}
