//! Backbone and head weights under canonical names (see [`crate::effnet`]), and their import from foreign
//! checkpoint formats and naming schemes.

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
