//! ONNX export of EfficientNet-B0 / EfficientNet-Lite0 plus linear heads (opset 17, IR 8), with batch norm folded into
//! the convolutions.
//!
//! # The exported graph
//! - One input (default name `image`): float32 `[batch, 3, H, W]`, `batch` symbolic, `H`/`W` fixed at export time
//!   (TF-SAME padding is computed statically from them).
//! - One output per head, named exactly the head's name: float32 `[batch, classes]` logits.
//!
//! Names are stable so that later passes (the INT8 quantizer) can find layers without pattern matching:
//! - Folded conv layers: node `{prefix}.conv`, initializers `{prefix}.conv.weight` / `{prefix}.conv.bias` (the
//!   *folded* values, not the canonical unfolded weight of the same name), output `{prefix}.conv.out`, for prefixes
//!   `stem`, `blocks.{i}.expand`, `blocks.{i}.dw`, `blocks.{i}.project`, `head`.
//! - Activations: node `{prefix}.act` (a `Mul` for SiLU, preceded by `{prefix}.act.sigmoid`; a `Clip` for ReLU6
//!   reading the shared scalars `relu6.min` / `relu6.max`), output `{prefix}.act.out`.
//! - Squeeze-excite (B0): `blocks.{i}.se.{pool,reduce,act,expand,gate,scale}`; the 1×1 conv initializers keep their
//!   canonical names `blocks.{i}.se.{reduce,expand}.{weight,bias}`.
//! - Residual: `blocks.{i}.add`. Pooling: `pool` then `flatten`, whose output is the `[batch, 1280]` value
//!   [`FEATURES`].
//! - Heads: `Gemm` node `heads.{name}` (transB = 1) with initializers `heads.{name}.{weight,bias}`.

mod export;
mod fold;
mod graph;
pub mod proto;
pub mod quant;

pub use export::conv_padding;
pub use fold::{BatchNorm, fold_bn};

use crate::effnet::{Arch, FEATURE_DIM};
use crate::weights::{Backbone, LinearHead};
use prost::Message;
use sha2::{Digest, Sha256};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// ONNX IR version written into every model: what ONNX 1.12, the release that introduced opset 17, writes.
pub const IR_VERSION: i64 = 8;
/// Default-domain operator set version.
pub const OPSET: i64 = 17;
/// `ModelProto.producer_name`.
pub const PRODUCER: &str = "attrd-trainer";
/// Name of the symbolic batch dimension on the input and every output.
pub const BATCH_DIM: &str = "batch";
/// Name of the pooled `[batch, 1280]` feature value that every head reads.
pub const FEATURES: &str = "features";
/// Default graph input name.
pub const DEFAULT_INPUT_NAME: &str = "image";

/// What [`export_effnet`] needs besides the weights.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportOptions {
    pub height: u32,
    pub width: u32,
    /// Graph input name; [`DEFAULT_INPUT_NAME`] unless the bundle format says otherwise.
    pub input_name: String,
    /// `ModelProto.doc_string`.
    pub doc: Option<String>,
    /// `ModelProto.metadata_props`, in order; keys must be distinct.
    pub metadata: Vec<(String, String)>,
}

impl ExportOptions {
    pub fn new(height: u32, width: u32) -> Self {
        Self { height, width, input_name: DEFAULT_INPUT_NAME.into(), doc: None, metadata: Vec::new() }
    }
}

impl Default for ExportOptions {
    /// The 224×224 resolution EfficientNet-B0 / Lite0 were trained at.
    fn default() -> Self {
        Self::new(224, 224)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("{arch} backbone is missing tensor {name:?}")]
    MissingTensor { arch: Arch, name: String },
    #[error("{arch} backbone has unexpected tensor {name:?} (weights of another architecture?)")]
    UnexpectedTensor { arch: Arch, name: String },
    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<usize>, actual: Vec<usize> },
    #[error("tensor {name:?} holds {len} values, which does not match its shape {shape:?}")]
    TensorLength { name: String, len: usize, shape: Vec<usize> },
    #[error("tensor {name:?} contains NaN or infinite values")]
    NonFinite { name: String },
    #[error("batch-norm epsilon {eps} is not a finite non-negative number")]
    InvalidBnEps { eps: f32 },
    #[error("cannot fold batch norm into {name:?}: {detail}")]
    FoldShape { name: String, detail: String },
    #[error("batch norm {name:?}: running_var + eps is not positive for channel {channel}")]
    NonPositiveVariance { name: String, channel: usize },
    #[error("at least one head is required")]
    NoHeads,
    #[error("head #{index} has an empty name")]
    EmptyHeadName { index: usize },
    #[error("head name {name:?} is used more than once")]
    DuplicateHeadName { name: String },
    #[error("head name {name:?} is also the graph input's name")]
    HeadNameIsInput { name: String },
    #[error("head name {name:?} collides with a value name inside the exported graph")]
    HeadNameReserved { name: String },
    #[error("head {name:?}: weight has shape {actual:?}, expected [classes, {FEATURE_DIM}] with at least one class")]
    HeadWeightShape { name: String, actual: Vec<usize> },
    #[error("head {name:?}: bias has shape {actual:?}, expected [{classes}]")]
    HeadBiasShape { name: String, classes: usize, actual: Vec<usize> },
    #[error("the graph input name must not be empty")]
    EmptyInputName,
    #[error("input size {height}×{width} is invalid: height and width must be at least 1")]
    InvalidInputSize { height: u32, width: u32 },
    #[error("metadata key {key:?} appears more than once")]
    DuplicateMetadataKey { key: String },
    #[error("the name {name:?} would be used twice in the graph (a head or input name shadowing an internal name?)")]
    NameCollision { name: String },
    #[error("the encoded model is {bytes} bytes, over protobuf's 2 GiB message limit")]
    ModelTooLarge { bytes: usize },
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a valid ONNX model", path.display())]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
}

/// Builds the inference graph for `backbone` with one `Gemm` output per head (in the given order).
///
/// Validates everything first (every canonical tensor present with its shape and finite, no foreign tensors, head
/// shapes `[C, 1280]`/`[C]`, head names non-empty, distinct and not the input name), so a returned model is complete.
pub fn export_effnet(
    backbone: &Backbone,
    heads: &[LinearHead],
    opts: &ExportOptions,
) -> Result<proto::ModelProto, OnnxError> {
    export::export_effnet(backbone, heads, opts)
}

/// Turns the backbone's ImageNet-style `classifier.{weight,bias}` into a head named `name`.
pub fn classifier_head(backbone: &Backbone, name: &str) -> Result<LinearHead, OnnxError> {
    export::classifier_head(backbone, name)
}

/// Serializes a model, refusing sizes protobuf readers (ONNX Runtime included) cannot parse.
pub fn encode_model(model: &proto::ModelProto) -> Result<Vec<u8>, OnnxError> {
    let len = model.encoded_len();
    if len > i32::MAX as usize {
        return Err(OnnxError::ModelTooLarge { bytes: len });
    }
    Ok(model.encode_to_vec())
}

/// Writes `model` to `path` atomically (a temporary file in the same directory, fsynced, then renamed over `path`),
/// so a reader never sees a truncated model. Returns the lowercase hex SHA-256 of the bytes written.
pub fn write_model(model: &proto::ModelProto, path: &Path) -> Result<String, OnnxError> {
    let bytes = encode_model(model)?;
    let digest = hex::encode(Sha256::digest(&bytes));
    let file_name = path.file_name().ok_or_else(|| {
        io_err("write", path)(io::Error::new(io::ErrorKind::InvalidInput, "the path does not name a file"))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // Unique per process and call, so concurrent exports to the same destination never share a temporary file.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("sync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io_err("rename into place", path))
    })();
    if result.is_err() {
        // Best effort: the original error is what matters; a leftover temp file is only clutter.
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    // Persist the rename itself. Best effort: some filesystems refuse fsync on directories, and the data is already
    // durable under one of the two names.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(digest)
}

fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> OnnxError + 'p {
    move |source| OnnxError::Io { op, path: path.to_owned(), source }
}

/// Reads and decodes an ONNX model. Fields outside [`proto`]'s subset are dropped.
pub fn read_model(path: &Path) -> Result<proto::ModelProto, OnnxError> {
    let bytes = std::fs::read(path).map_err(io_err("read", path))?;
    proto::ModelProto::decode(bytes.as_slice()).map_err(|source| OnnxError::Decode { path: path.to_owned(), source })
}
