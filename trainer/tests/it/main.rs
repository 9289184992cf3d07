//! The trainer crate's single integration-test binary; each module covers one area.

mod onnx;
#[cfg(feature = "torch")]
mod torch_model;
mod weights;
