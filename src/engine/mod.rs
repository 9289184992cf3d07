//! ONNX Runtime inference engine.
