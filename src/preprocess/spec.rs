//! What the model expects as input ([`InputSpec`]) and how much untrusted input we accept ([`Limits`]).

use super::PreprocessError;
use serde::{Deserialize, Serialize};

/// Largest accepted model input side, in pixels. Generous for classification backbones; mostly a guard against
/// typos such as `22400`.
pub const MAX_INPUT_SIDE: u32 = 4096;

/// Per-channel mean of ImageNet (RGB, values scaled to 0..1), used by torchvision and timm EfficientNets.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel standard deviation of ImageNet (RGB, values scaled to 0..1).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How an image becomes the model's input tensor. Stored verbatim in the model-bundle manifest as `"input"`, so the
/// trainer and the daemon preprocess identically; every field is required in JSON.
///
/// Pipeline: decode to RGB8 (alpha composited over [`fill`](Self::fill), EXIF orientation applied) → resize per
/// [`resize`](Self::resize) with [`interpolation`](Self::interpolation) to `width`×`height`, rounding to 8 bits →
/// `(v / 255 - mean) / std` per channel → [`channel_order`](Self::channel_order) → [`layout`](Self::layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Model input width in pixels, 1..=4096.
    pub width: u32,
    /// Model input height in pixels, 1..=4096.
    pub height: u32,
    /// How the image's aspect ratio is reconciled with `width`×`height`.
    pub resize: ResizeMode,
    /// `center_crop` only (must still be valid, conventionally `1.0`, for the other modes): the fraction of the
    /// resized image that the crop keeps. The image is scaled so that a `width/crop_fraction` ×
    /// `height/crop_fraction` box just covers it (for a square target: shorter side → `width / crop_fraction`), and
    /// the central `width`×`height` is kept. `0.875` reproduces torchvision's `Resize(256) + CenterCrop(224)`; `1.0`
    /// scales the shorter side to the target and crops only the longer one. Range (0, 1].
    pub crop_fraction: f32,
    /// Resampling filter. The convolution filters are antialiased when downscaling (Pillow semantics).
    pub interpolation: Interpolation,
    /// RGB colour of the `letterbox` padding. Also the matte that transparent pixels (PNG/WebP alpha) are
    /// composited onto, in every mode, so that a cut-out product looks like it does on a studio background:
    /// `[255, 255, 255]` for white-background catalogues.
    pub fill: [u8; 3],
    /// Per-channel mean, RGB order (independent of `channel_order`), of values scaled to 0..1.
    pub mean: [f32; 3],
    /// Per-channel standard deviation, RGB order, of values scaled to 0..1; each finite and > 0.
    pub std: [f32; 3],
    /// Order of the colour channels in the output tensor.
    pub channel_order: ChannelOrder,
    /// Memory layout of the output tensor.
    pub layout: Layout,
}

/// How the source aspect ratio is mapped onto the model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Scale (keeping aspect) so the image covers the target enlarged by `1/crop_fraction`, then keep the centre
    /// `width`×`height`. Loses the borders, never distorts.
    CenterCrop,
    /// Scale (keeping aspect) to fit inside the target, centre it, pad with `fill`. Keeps everything, never
    /// distorts; the natural choice for products on a plain background.
    Letterbox,
    /// Scale each axis independently to the target. Keeps everything, distorts.
    Stretch,
}

/// Resampling filter of the resize step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// Nearest neighbour (no antialiasing).
    Nearest,
    /// Triangle filter, like Pillow's `BILINEAR` and torchvision's antialiased bilinear.
    Bilinear,
    /// Catmull-Rom cubic (a = -0.5), like Pillow's `BICUBIC`.
    Bicubic,
    /// Lanczos with 3 lobes, like Pillow's `LANCZOS`.
    Lanczos3,
}

/// Order of colour channels in the output tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelOrder {
    /// Red, green, blue (PyTorch / torchvision models).
    Rgb,
    /// Blue, green, red (models exported from OpenCV/Caffe pipelines).
    Bgr,
}

/// Memory layout of one image in the output tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Channel planes: index `c*H*W + y*W + x` (PyTorch, ONNX default).
    Nchw,
    /// Interleaved pixels: index `(y*W + x)*3 + c` (TensorFlow / TFLite).
    Nhwc,
}

impl InputSpec {
    /// The usual ImageNet-trained EfficientNet input: `center_crop` at 0.875, bicubic, ImageNet mean/std, RGB, NCHW,
    /// white fill (used for transparent pixels only in this mode).
    pub fn imagenet(width: u32, height: u32) -> Self {
        InputSpec {
            width,
            height,
            resize: ResizeMode::CenterCrop,
            crop_fraction: 0.875,
            interpolation: Interpolation::Bicubic,
            fill: [255, 255, 255],
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            channel_order: ChannelOrder::Rgb,
            layout: Layout::Nchw,
        }
    }

    /// Number of `f32`s in one image's tensor: `3 * width * height`.
    pub fn tensor_len(&self) -> usize {
        3 * self.width as usize * self.height as usize
    }

    /// Checks every field; a spec that passes cannot make preprocessing fail or panic.
    pub fn validate(&self) -> Result<(), PreprocessError> {
        let invalid = |msg: String| Err(PreprocessError::InvalidSpec(msg));
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if !(1..=MAX_INPUT_SIDE).contains(&v) {
                return invalid(format!("{name} is {v}, must be 1..={MAX_INPUT_SIDE} pixels"));
            }
        }
        // Written so that NaN fails too.
        if !(self.crop_fraction > 0.0 && self.crop_fraction <= 1.0) {
            return invalid(format!(
                "crop_fraction is {}, must be in (0, 1] (e.g. 0.875, or 1.0 for no extra margin)",
                self.crop_fraction
            ));
        }
        for (i, channel) in ["red", "green", "blue"].iter().enumerate() {
            let (m, s) = (self.mean[i], self.std[i]);
            if !m.is_finite() {
                return invalid(format!("mean[{i}] ({channel}) is {m}, must be finite"));
            }
            if !(s.is_finite() && s > 0.0) {
                return invalid(format!("std[{i}] ({channel}) is {s}, must be finite and > 0"));
            }
            // A std so small that normalized values overflow to infinity is a unit mistake (0..255 vs 0..1).
            if !((1.0 - m) / s).is_finite() || !((0.0 - m) / s).is_finite() {
                return invalid(format!("std[{i}] ({channel}) is {s}: normalized values would overflow"));
            }
        }
        Ok(())
    }
}

/// Bounds on untrusted input, enforced before the expensive work: file size before reading, pixel count from the
/// image header before decoding (decompression bombs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted encoded image, in bytes. Default 64 MiB.
    pub max_file_bytes: u64,
    /// Largest accepted image, in pixels (`width * height` from the header, at full resolution even when a JPEG is
    /// decoded at a reduced scale). Default 100 megapixels; studio photos are 20–50 MP.
    pub max_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_file_bytes: 64 * 1024 * 1024, max_pixels: 100_000_000 }
    }
}

impl Limits {
    /// Both limits must be at least 1.
    pub fn validate(&self) -> Result<(), PreprocessError> {
        if self.max_file_bytes == 0 {
            return Err(PreprocessError::InvalidLimits("max_file_bytes is 0, must be at least 1".into()));
        }
        if self.max_pixels == 0 {
            return Err(PreprocessError::InvalidLimits("max_pixels is 0, must be at least 1".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imagenet_spec_is_valid_and_sized() {
        let s = InputSpec::imagenet(224, 224);
        s.validate().unwrap();
        assert_eq!(s.tensor_len(), 3 * 224 * 224);
    }

    #[test]
    fn validate_rejects_each_bad_field() {
        let ok = InputSpec::imagenet(224, 224);
        let cases: Vec<(InputSpec, &str)> = vec![
            (InputSpec { width: 0, ..ok.clone() }, "width is 0"),
            (InputSpec { height: 4097, ..ok.clone() }, "height is 4097"),
            (InputSpec { crop_fraction: 0.0, ..ok.clone() }, "crop_fraction is 0"),
            (InputSpec { crop_fraction: 1.5, ..ok.clone() }, "crop_fraction is 1.5"),
            (InputSpec { crop_fraction: f32::NAN, ..ok.clone() }, "crop_fraction is NaN"),
            (InputSpec { std: [0.2, 0.0, 0.2], ..ok.clone() }, "std[1] (green) is 0"),
            (InputSpec { std: [0.2, 0.2, -1.0], ..ok.clone() }, "std[2] (blue) is -1"),
            (InputSpec { std: [f32::INFINITY, 0.2, 0.2], ..ok.clone() }, "std[0] (red) is inf"),
            (InputSpec { mean: [0.0, f32::NAN, 0.0], ..ok.clone() }, "mean[1] (green) is NaN"),
            (InputSpec { std: [1e-40, 0.2, 0.2], ..ok.clone() }, "would overflow"),
        ];
        for (spec, want) in cases {
            let err = spec.validate().unwrap_err();
            assert!(matches!(err, PreprocessError::InvalidSpec(_)), "{err:?}");
            assert!(err.to_string().contains(want), "{err} does not mention {want:?}");
        }
        // Boundaries are inclusive.
        InputSpec { width: 1, height: 4096, crop_fraction: 1.0, ..ok }.validate().unwrap();
    }

    #[test]
    fn limits_validate() {
        Limits::default().validate().unwrap();
        assert!(Limits { max_pixels: 0, ..Limits::default() }.validate().is_err());
        assert!(Limits { max_file_bytes: 0, ..Limits::default() }.validate().is_err());
    }
}
