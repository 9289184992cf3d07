//! The trainer library: everything `trainer` does, importable by its tests.

pub mod curate;
pub mod effnet;
pub mod eval;
pub mod onnx;
pub mod plot;
pub mod quantize;
#[cfg(feature = "torch")]
pub mod torch;
pub mod train;
pub mod weights;
