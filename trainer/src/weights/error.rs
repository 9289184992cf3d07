//! Errors from reading, importing, saving and loading weights.

use crate::effnet::Arch;
use std::fmt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "unrecognised checkpoint format (expected safetensors, a PyTorch zip archive or a legacy PyTorch pickle); \
         first bytes: {head}"
    )]
    UnknownFormat { head: String },

    #[error("invalid safetensors data")]
    Safetensors(#[source] safetensors::SafeTensorError),

    #[error("invalid PyTorch zip archive")]
    Zip(#[source] zip::result::ZipError),

    /// Reading a member of a zip archive failed after the archive itself was opened (e.g. a bad deflate stream).
    #[error("cannot read {member} from the PyTorch zip archive")]
    ZipMember {
        member: String,
        #[source]
        source: std::io::Error,
    },

    #[error("corrupt pickle at byte {offset}: {reason}")]
    Pickle { offset: usize, reason: String },

    /// The pickle names a global that is not on the allow-list. Nothing is ever executed, but a checkpoint that
    /// needs such a global to load is either not a plain state dict or is hostile, so it is refused outright.
    #[error(
        "refusing to load global {module}.{name}: only tensors and plain containers are accepted from a pickle, \
         and this name is not on the allow-list (a full-model pickle or a hostile file?)"
    )]
    ForbiddenGlobal { module: String, name: String },

    #[error("malformed checkpoint: {0}")]
    Malformed(String),

    #[error("tensor {name}: dtype {dtype} cannot be used as a weight (expected a floating-point type)")]
    UnsupportedDtype { name: String, dtype: String },

    #[error("no state dict found in the checkpoint (top-level keys: {keys})")]
    NoStateDict { keys: String },

    #[error(
        "cannot tell which naming scheme the checkpoint uses (lukemelas, torchvision, timm, canonical); first keys: {sample}"
    )]
    UnknownSource { sample: String },

    #[error(transparent)]
    Mismatch(Box<Mismatch>),

    #[error("{} is not an attrd canonical weights file: {reason}", path.display())]
    NotCanonical { path: PathBuf, reason: String },

    /// A file with canonical names but without our metadata says nothing about how it was trained; guessing padding
    /// or BN epsilon would lose accuracy silently.
    #[error(
        "the checkpoint uses canonical names but carries no attrd metadata, so its {what} is unknown; pass it explicitly"
    )]
    MissingConvention { what: &'static str },

    #[error("invalid weights: {0}")]
    Invalid(String),
}

/// The tensors found do not match what the architecture needs. All lists are complete; `Display` shows up to
/// [`Mismatch::SHOWN`] of each.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub arch: Arch,
    /// Naming scheme (or file kind) the names came from, for the message.
    pub source: String,
    /// Canonical names the architecture needs that the file lacks.
    pub missing: Vec<String>,
    /// Names in the file that the architecture does not have. Names that could not be mapped are given as they
    /// appear in the file, mapped ones as `canonical (from original)`.
    pub unexpected: Vec<String>,
    pub misshaped: Vec<Misshaped>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Misshaped {
    pub name: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

impl Mismatch {
    pub const SHOWN: usize = 10;

    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.misshaped.is_empty()
    }
}

impl std::error::Error for Mismatch {}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "checkpoint tensors do not match {} (names from {}): {} missing, {} unexpected, {} mis-shaped",
            self.arch,
            self.source,
            self.missing.len(),
            self.unexpected.len(),
            self.misshaped.len()
        )?;
        let list = |f: &mut fmt::Formatter<'_>, label: &str, items: Vec<String>| -> fmt::Result {
            if items.is_empty() {
                return Ok(());
            }
            write!(f, "\n  {label}: ")?;
            for (i, item) in items.iter().take(Self::SHOWN).enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                f.write_str(item)?;
            }
            if items.len() > Self::SHOWN {
                write!(f, ", … and {} more", items.len() - Self::SHOWN)?;
            }
            Ok(())
        };
        list(f, "missing", self.missing.clone())?;
        list(f, "unexpected", self.unexpected.clone())?;
        list(
            f,
            "mis-shaped",
            self.misshaped
                .iter()
                .map(|m| format!("{} expected {:?} found {:?}", m.name, m.expected, m.found))
                .collect(),
        )?;
        // The most common real-world mix-up is B0 vs Lite0; say so rather than leaving 80 SE names to decode.
        let is_se = |n: &String| n.contains(".se.") || n.contains("_se_") || n.contains(".fc1.") || n.contains(".fc2.");
        if self.arch == Arch::B0 && !self.missing.is_empty() && self.missing.iter().all(is_se) {
            write!(f, "\n  hint: the file has no squeeze-excite tensors; is it an EfficientNet-Lite0 checkpoint?")?;
        }
        if self.arch == Arch::Lite0 && self.missing.is_empty() && self.unexpected.iter().any(is_se) {
            write!(f, "\n  hint: the file has squeeze-excite tensors; is it an EfficientNet-B0 checkpoint?")?;
        }
        Ok(())
    }
}
