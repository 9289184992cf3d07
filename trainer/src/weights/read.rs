//! Reading tensors out of a checkpoint file of any supported container format.

use super::error::WeightsError;
use super::raw::{DType, RawTensor, TensorData};
use super::torch;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// Container format, told apart by the first bytes (never by the file extension: `.pth` files come in all three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    Safetensors,
    /// `torch.save` since torch 1.6: a zip archive with `data.pkl` and one member per storage.
    TorchZip,
    /// `torch.save` before torch 1.6 (or with `_use_new_zipfile_serialization=False`): concatenated pickles.
    TorchLegacy,
}

impl fmt::Display for CheckpointFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckpointFormat::Safetensors => "safetensors",
            CheckpointFormat::TorchZip => "torch-zip",
            CheckpointFormat::TorchLegacy => "torch-legacy",
        })
    }
}

/// Everything read from a checkpoint before name mapping.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub format: CheckpointFormat,
    /// Container keys the state dict was nested under (e.g. `["state_dict"]`); empty for a bare state dict.
    pub container: Vec<String>,
    /// Safetensors `__metadata__`; empty for torch files.
    pub metadata: BTreeMap<String, String>,
    /// Tensor name → tensor, with `module.` / `_orig_mod.` wrapper prefixes removed.
    pub tensors: BTreeMap<String, RawTensor>,
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
}

pub fn sniff(bytes: &[u8]) -> Option<CheckpointFormat> {
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return Some(CheckpointFormat::TorchZip);
    }
    if bytes.first() == Some(&0x80) {
        return Some(CheckpointFormat::TorchLegacy);
    }
    // safetensors: u64 header length, then a JSON object.
    if bytes.len() > 8 && bytes[8] == b'{' {
        return Some(CheckpointFormat::Safetensors);
    }
    None
}

/// Reads every tensor of a checkpoint: safetensors, torch zip, or legacy torch. State dicts nested in training
/// checkpoints (`state_dict`, `model`, `model_state_dict`, `ema`, ...) are unwrapped and `module.` prefixes
/// (DataParallel) and `_orig_mod.` prefixes (torch.compile) stripped.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, RawTensor>, WeightsError> {
    Ok(read_checkpoint(path)?.tensors)
}

/// Like [`read_tensors`], also returning the format, nesting, metadata and file hash.
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint, WeightsError> {
    // Whole-file reads: checkpoints for these models are tens of MB and every tensor is materialized anyway.
    let bytes = std::fs::read(path).map_err(|source| WeightsError::Read { path: path.to_owned(), source })?;
    let ckpt = read_checkpoint_bytes(&bytes)?;
    tracing::debug!(path = %path.display(), format = %ckpt.format, tensors = ckpt.tensors.len(), "read checkpoint");
    Ok(ckpt)
}

/// [`read_checkpoint`] on bytes in memory; the entry point for fuzzing.
pub fn read_checkpoint_bytes(bytes: &[u8]) -> Result<Checkpoint, WeightsError> {
    let sha256 = hex::encode(Sha256::digest(bytes));
    let format = sniff(bytes).ok_or_else(|| WeightsError::UnknownFormat {
        head: bytes.iter().take(16).map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "),
    })?;
    let (container, metadata, tensors) = match format {
        CheckpointFormat::Safetensors => {
            let (metadata, tensors) = read_safetensors(bytes)?;
            (Vec::new(), metadata, tensors)
        }
        CheckpointFormat::TorchZip => {
            let c = torch::read_zip(bytes)?;
            (c.container, BTreeMap::new(), c.tensors)
        }
        CheckpointFormat::TorchLegacy => {
            let c = torch::read_legacy(bytes)?;
            (c.container, BTreeMap::new(), c.tensors)
        }
    };
    Ok(Checkpoint { format, container, metadata, tensors: strip_wrapper_prefixes(tensors)?, sha256 })
}

/// Safetensors `__metadata__` and tensors.
type SafetensorsContents = (BTreeMap<String, String>, BTreeMap<String, RawTensor>);

fn read_safetensors(bytes: &[u8]) -> Result<SafetensorsContents, WeightsError> {
    use safetensors::{Dtype, SafeTensors};
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(WeightsError::Safetensors)?;
    let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    let st = SafeTensors::deserialize(bytes).map_err(WeightsError::Safetensors)?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        let dtype = match view.dtype() {
            Dtype::F64 => DType::F64,
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::I64 => DType::I64,
            Dtype::I32 => DType::I32,
            Dtype::I16 => DType::I16,
            Dtype::I8 => DType::I8,
            Dtype::U8 => DType::U8,
            Dtype::BOOL => DType::Bool,
            other => {
                return Err(WeightsError::UnsupportedDtype { name: name.to_owned(), dtype: other.to_string() });
            }
        };
        // The safetensors crate has validated that data length = numel × dtype size.
        let data = TensorData::decode(dtype, view.data(), false);
        tensors.insert(name.to_owned(), RawTensor { shape: view.shape().to_vec(), data });
    }
    Ok((metadata, tensors))
}

/// `nn.DataParallel` saves `module.`-prefixed names and `torch.compile` `_orig_mod.`-prefixed ones; neither is
/// part of the model's own naming.
fn strip_wrapper_prefixes(tensors: BTreeMap<String, RawTensor>) -> Result<BTreeMap<String, RawTensor>, WeightsError> {
    let mut out = BTreeMap::new();
    let mut stripped = 0usize;
    for (name, t) in tensors {
        let mut n = name.as_str();
        while let Some(rest) = n.strip_prefix("module.").or_else(|| n.strip_prefix("_orig_mod.")) {
            n = rest;
        }
        if n.len() != name.len() {
            stripped += 1;
        }
        if out.insert(n.to_owned(), t).is_some() {
            return Err(WeightsError::Malformed(format!(
                "two tensors are both named {n} once wrapper prefixes are removed"
            )));
        }
    }
    if stripped > 0 {
        tracing::debug!(stripped, "removed module./_orig_mod. prefixes");
    }
    Ok(out)
}
