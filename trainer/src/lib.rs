//! The trainer library: everything `trainer` does, importable by its tests.

pub mod effnet;
pub mod onnx;
#[cfg(feature = "torch")]
pub mod torch;
pub mod weights;
