//! The trainer crate's single integration-test binary; each module covers one area.

#[cfg(feature = "torch")]
mod cli_pipeline;
mod common;
mod curate;
#[cfg(feature = "torch")]
mod eval;
mod lifecycle;
mod onnx;
mod ort_rt;
#[cfg(feature = "torch")]
mod parity;
mod quant;
#[cfg(feature = "torch")]
mod torch_model;
#[cfg(feature = "torch")]
mod train;
mod weights;
