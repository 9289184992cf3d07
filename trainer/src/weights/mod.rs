//! Backbone and head weights under canonical names (see [`crate::effnet`]), and their import from foreign
//! checkpoint formats and naming schemes.

//!
//! - [`read_tensors`] reads any supported container: safetensors, PyTorch zip (torch ≥ 1.6) and legacy PyTorch
//!   pickles (torch < 1.6), the latter two through a restricted pickle VM that never executes code.
//! - [`import`] detects the naming scheme ([`Source`]) and architecture, maps names, converts to f32, validates the
//!   exact key set and shapes, and fills in the training conventions ([`default_convention`]).
//! - [`Backbone::save`] / [`Backbone::load`] read and write our canonical file ([`FORMAT_TAG`]);
//!   [`Backbone::random`] initializes from scratch.

mod canonical;
mod error;
mod import;
mod names;
mod pickle;
mod raw;
mod read;
mod torch;

pub use canonical::FORMAT_TAG;
pub use error::{Mismatch, Misshaped, WeightsError};
pub use import::{ImportOptions, ImportReport, default_convention, import, import_checkpoint};
pub use names::{NameMapper, Source};
pub use raw::{DType, RawTensor, TensorData, bf16_to_f32, f16_to_f32};
pub use read::{Checkpoint, CheckpointFormat, read_checkpoint, read_checkpoint_bytes, read_tensors, sniff};

use crate::effnet::{Arch, Padding};
use std::collections::BTreeMap;

/// A dense little-endian f32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// An EfficientNet backbone (and optionally its single ImageNet-style classifier) under canonical names.
#[derive(Debug, Clone)]
pub struct Backbone {
    pub arch: Arch,
    /// The padding convention the weights were trained with.
    pub padding: Padding,
    /// Batch-norm epsilon the weights were trained with (TF ports: 1e-3, torchvision: 1e-5).
    pub bn_eps: f32,
    /// Canonical name → tensor; exactly [`Arch::backbone_tensors`] plus optional `classifier.{weight,bias}`.
    pub tensors: BTreeMap<String, Tensor>,
    /// Where the weights came from; written to and read from the canonical file's metadata.
    pub provenance: Provenance,
}

/// Origin of a set of weights, kept so that a trained bundle can be traced back to the checkpoint it started from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Provenance {
    /// `lukemelas` / `torchvision` / `timm` for imports, `random:seed=N` for [`Backbone::random`], or whatever a
    /// later stage (e.g. training) records.
    pub source: String,
    /// Hex SHA-256 of the imported checkpoint file.
    pub source_sha256: Option<String>,
}

/// One linear attribute head on top of the pooled 1280-d features.
#[derive(Debug, Clone)]
pub struct LinearHead {
    /// Attribute name; also the ONNX output name.
    pub name: String,
    /// `[classes, 1280]`
    pub weight: Tensor,
    /// `[classes]`
    pub bias: Tensor,
}
