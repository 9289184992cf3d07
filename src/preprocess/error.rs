//! Errors of the preprocessing pipeline.

use std::fmt;
use std::path::PathBuf;

/// A decoder's own error, kept as the [`std::error::Error::source`] of ours.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Image container formats we decode, detected from the first bytes of the data (never from a file name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageKind {
    Jpeg,
    Png,
    Webp,
}

impl ImageKind {
    /// Human-readable name, as used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Jpeg => "JPEG",
            ImageKind::Png => "PNG",
            ImageKind::Webp => "WebP",
        }
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an image could not be turned into a tensor, or why a spec/limits were refused. Messages name the offending
/// values; the underlying decoder or I/O error is the [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreprocessError {
    /// Zero bytes of input.
    #[error("image data is empty (0 bytes)")]
    Empty,

    /// The encoded file is larger than [`Limits::max_file_bytes`](super::Limits::max_file_bytes).
    #[error("image file is {} ({bytes} bytes), over the {} limit", mib(*.bytes), mib(*.limit))]
    FileTooLarge { bytes: u64, limit: u64 },

    /// The header announces more pixels than [`Limits::max_pixels`](super::Limits::max_pixels); nothing was decoded.
    #[error(
        "image is {width}x{height} = {} MP, over the {} MP limit",
        megapixels(u64::from(*.width) * u64::from(*.height), 1),
        megapixels(*.limit, 0)
    )]
    TooManyPixels { width: u32, height: u32, limit: u64 },

    /// Not JPEG, PNG or WebP, and not a format we recognise either.
    #[error("unrecognised image format (first bytes: {magic}); expected JPEG, PNG or WebP")]
    UnknownFormat {
        /// Up to the first 12 bytes, as hex.
        magic: String,
    },

    /// A recognised image format that we do not decode.
    #[error("{format} images are not supported; expected JPEG, PNG or WebP")]
    UnsupportedFormat { format: &'static str },

    /// The data is recognisably `format` but the decoder rejected it (corrupt, or an unsupported variant).
    #[error("could not decode {format} image")]
    Decode {
        format: ImageKind,
        #[source]
        source: BoxError,
    },

    /// The data ends before the image is complete: an interrupted upload or a file still being written.
    #[error("{format} image is truncated: the data ends after {len} bytes, before the image is complete")]
    Truncated {
        format: ImageKind,
        len: usize,
        #[source]
        source: Option<BoxError>,
    },

    /// Reading an image file failed.
    #[error("could not read image file {}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An [`InputSpec`](super::InputSpec) field is out of range.
    #[error("invalid input spec: {0}")]
    InvalidSpec(String),

    /// A [`Limits`](super::Limits) field is out of range.
    #[error("invalid preprocessing limits: {0}")]
    InvalidLimits(String),
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn megapixels(pixels: u64, decimals: usize) -> String {
    let mp = pixels as f64 / 1e6;
    // "100 MP" rather than "100.0 MP" for round limits, but never round a real value down to a misleading integer.
    if decimals == 0 && mp.fract() != 0.0 { format!("{mp:.1}") } else { format!("{mp:.decimals$}") }
}

/// A decoder panicked on hostile input; reported as an ordinary decode error instead of taking the daemon down.
#[derive(Debug, thiserror::Error)]
#[error("decoder panicked: {0}")]
pub(crate) struct DecoderPanic(pub(crate) String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_specific() {
        let e = PreprocessError::TooManyPixels { width: 30000, height: 30000, limit: 100_000_000 };
        assert_eq!(e.to_string(), "image is 30000x30000 = 900.0 MP, over the 100 MP limit");
        let e = PreprocessError::TooManyPixels { width: 5000, height: 5000, limit: 2_500_000 };
        assert_eq!(e.to_string(), "image is 5000x5000 = 25.0 MP, over the 2.5 MP limit");
        let e = PreprocessError::FileTooLarge { bytes: 70 * 1024 * 1024, limit: 64 * 1024 * 1024 };
        assert_eq!(e.to_string(), "image file is 70.0 MiB (73400320 bytes), over the 64.0 MiB limit");
    }
}
