//! The trainer crate's single integration-test binary; each module covers one area.

mod onnx;
mod weights;
