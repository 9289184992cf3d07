//! The libtorch (tch) EfficientNet used for fine-tuning, and the bridge between its `VarStore` and the canonical
//! [`Backbone`](crate::weights::Backbone) / [`LinearHead`](crate::weights::LinearHead) weights that import and ONNX
//! export speak.
//!
//! Variables live in the `VarStore` under exactly the canonical names of [`crate::effnet`] (build the model on
//! `vs.root()`), plus `heads.{name}.{weight,bias}` for each attribute head, so moving weights in and out is a
//! name-for-name copy with shape checks and no renaming tables.

pub mod audit_run;
mod convert;
pub mod fit;
pub mod gradcam;
mod model;
pub mod report;

pub use convert::{classifier_as_head, export_backbone, export_heads, load_backbone, load_heads};
pub use model::{
    BN_MOMENTUM, EffNet, GROUP_BACKBONE_DECAY, GROUP_BACKBONE_NO_DECAY, GROUP_HEAD_DECAY, GROUP_HEAD_NO_DECAY, LastConv,
};

/// Errors from building, running, loading or exporting the libtorch model.
#[derive(Debug, thiserror::Error)]
pub enum TorchError {
    #[error("libtorch failed while {context}")]
    Tch {
        context: String,
        #[source]
        source: tch::TchError,
    },
    #[error("head name {0:?} is unusable: it must be non-empty and contain no '.'")]
    BadHeadName(String),
    #[error("head name {0:?} is used twice")]
    DuplicateHead(String),
    #[error("head {0:?} has no classes")]
    EmptyHead(String),
    #[error("{what} probability {value} is outside [0, 1)")]
    BadProbability { what: &'static str, value: f64 },
    #[error("input must be a [N, 3, H, W] tensor with N, H, W > 0, got shape {0:?}")]
    BadInput(Vec<i64>),
    #[error("tensor {name:?} is missing from the {from}")]
    Missing { name: String, from: &'static str },
    #[error("tensor {name:?} has shape {got:?} in the {from}, expected {expected:?}")]
    Shape { name: String, from: &'static str, got: Vec<usize>, expected: Vec<usize> },
    #[error("tensor {name:?} holds {len} values but its shape {shape:?} needs {expected}")]
    DataLength { name: String, shape: Vec<usize>, len: usize, expected: usize },
    #[error(
        "variable {name:?} in the var store is not part of a {arch} backbone (model built for another architecture?)"
    )]
    UnexpectedVariable { name: String, arch: crate::effnet::Arch },
    #[error("backbone tensor {name:?} is not part of a {arch} backbone")]
    UnexpectedTensor { name: String, arch: crate::effnet::Arch },
}

/// Attaches what we were doing to a libtorch error, since `TchError` alone rarely says which layer failed.
pub(crate) trait TchContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, TorchError>;
}

impl<T> TchContext<T> for Result<T, tch::TchError> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, TorchError> {
        self.map_err(|source| TorchError::Tch { context: context(), source })
    }
}
