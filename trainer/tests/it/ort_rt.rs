//! ONNX Runtime plumbing shared by the test modules: ORT allows one environment per process, and every module of
//! this binary runs in the same process.

use ndarray::{Array2, Array4};
use ort::environment::Environment;
use ort::session::Session;
use ort::value::TensorRef;
use std::sync::OnceLock;
use trainer::onnx::{self, proto::ModelProto};

pub fn env() -> &'static Environment {
    // attrd's engine and these tests share one process, and ORT allows one environment per process: use attrd's.
    static ENV: OnceLock<std::sync::Arc<Environment>> = OnceLock::new();
    ENV.get_or_init(|| {
        attrd::engine::environment(&attrd::engine::EngineConfig::cpu()).expect("ONNX Runtime environment")
    })
}

pub fn session(model: &ModelProto) -> Session {
    let bytes = onnx::encode_model(model).expect("encode");
    attrd::engine::session_builder(env())
        .expect("session builder")
        .with_intra_threads(1)
        .expect("threads")
        .commit_from_memory(&bytes)
        .expect("ONNX Runtime accepts the exported model")
}

/// Runs the session and returns each output (in graph order) as `[batch, classes]`.
pub fn run(session: &mut Session, input_name: &str, images: &Array4<f32>) -> Vec<(String, Array2<f32>)> {
    let outputs = session
        .run(ort::inputs![input_name => TensorRef::from_array_view(images).expect("input tensor")])
        .expect("inference");
    outputs
        .iter()
        .map(|(name, v)| {
            let a = v.try_extract_array::<f32>().expect("f32 output");
            let a = a.into_dimensionality::<ndarray::Ix2>().expect("rank-2 output").to_owned();
            (name.to_string(), a)
        })
        .collect()
}
