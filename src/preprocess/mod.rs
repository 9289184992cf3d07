//! Shared image preprocessing: encoded image bytes → the model's input tensor.
//!
//! The daemon and the trainer both go through [`Preprocessor`], configured by the [`InputSpec`] stored in the
//! model bundle, so a model is served exactly the way it was trained.
//!
//! Pipeline ([`Preprocessor::prepare`]):
//! 1. **Sniff** JPEG / PNG / WebP from the magic bytes; enforce [`Limits::max_file_bytes`].
//! 2. **Header**: read the dimensions and enforce [`Limits::max_pixels`] before any pixel is decoded.
//! 3. **Decode** to RGB8. Ordinary JPEGs go through libjpeg-turbo (the default `turbojpeg` feature); CMYK,
//!    lossless, 12-bit and damaged ones, and any file libjpeg-turbo warns about, through jpeg-decoder, which also
//!    produces every JPEG error ([`Decoded::codec`] says which one ran). A large JPEG is decoded at 1/2, 1/4 or
//!    1/8 scale in the DCT domain when the resize step still only downsamples from there (several times faster,
//!    same output quality; jpeg-decoder stops at 1/4, see `resize::MAX_DCT_REDUCTION`). At 1/8, clean baseline
//!    files go first through attrd's own decoder (`eighth.rs`, [`Codec::OneEighth`]), which skips the AC terms
//!    1/8 does not need and gives libjpeg-turbo's 1/8 pixels to the bit; it declines anything else to
//!    libjpeg-turbo. Grey, CMYK (Adobe), 16-bit and palette images are converted; alpha is composited over
//!    [`InputSpec::fill`].
//! 4. **Orient**: apply the EXIF orientation (all 8 values).
//! 5. **Resize** per [`ResizeMode`] with fast_image_resize (Pillow-compatible kernels); see [Geometry](#geometry).
//! 6. **Normalize** `(v/255 - mean) / std`, reorder channels, lay out as NCHW or NHWC.
//!
//! # Geometry
//! For a `W`×`H` source and a `w`×`h` target (`round` = half up):
//! - `stretch`: the whole image to `w`×`h`.
//! - `letterbox`: `r = min(w/W, h/H)`, the whole image to `round(W*r)`×`round(H*r)`, centred (offsets rounded
//!   down), padded with `fill`.
//! - `center_crop`: `r = max(w/W, h/H) / crop_fraction`; the centred source box of `(w/r)`×`(h/r)` pixels
//!   (fractional) is resampled to `w`×`h` in one pass. That is "resize, then centre-crop" without the
//!   intermediate integer rounding of torchvision's two-step version (they differ by under a pixel of shift).
//!
//! Resampling matches Pillow's `Image.resize(size, filter, box=...)`, rounded to 8 bits;
//! `scripts/make-image-fixtures.py` holds the Python twin of this geometry, and the tests compare against it.

mod decode;
#[cfg(feature = "turbojpeg")]
mod eighth;
mod error;
mod resize;
mod spec;
#[cfg(feature = "turbojpeg")]
mod turbo;

pub use decode::{Codec, Decoded};

/// attrd's 1/8-scale JPEG decoder on its own ([`Codec::OneEighth`]; `Err` with the reason when it declines the
/// file), for the differential fuzz target and the tests. Not part of the API: [`Preprocessor`] picks it itself.
#[doc(hidden)]
#[cfg(feature = "turbojpeg")]
pub fn decode_one_eighth(bytes: &[u8], max_pixels: u64) -> Result<image::RgbImage, String> {
    turbo::one_eighth(bytes, max_pixels).map_err(|e| e.to_string())
}

/// libjpeg-turbo's own 1/8-scale decode (`Err` on any warning): the reference for [`decode_one_eighth`].
#[doc(hidden)]
#[cfg(feature = "turbojpeg")]
pub fn libjpeg_turbo_one_eighth(bytes: &[u8], max_pixels: u64) -> Result<image::RgbImage, String> {
    turbo::libjpeg_one_eighth(bytes, max_pixels).map_err(|e| e.to_string())
}
pub use error::{BoxError, ImageKind, PreprocessError};
pub use spec::{
    ChannelOrder, IMAGENET_MEAN, IMAGENET_STD, InputSpec, Interpolation, Layout, Limits, MAX_INPUT_SIDE, ResizeMode,
};

use ndarray::Array4;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// Turns encoded images into input tensors for one [`InputSpec`]. Cheap to clone (shared, immutable state);
/// `Send + Sync`, so one instance can serve every worker thread.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    spec: InputSpec,
    limits: Limits,
    normalizer: resize::Normalizer,
}

impl Preprocessor {
    /// Validates `spec` and `limits` and precomputes the normalization tables.
    pub fn new(spec: InputSpec, limits: Limits) -> Result<Self, PreprocessError> {
        spec.validate()?;
        limits.validate()?;
        let normalizer = resize::Normalizer::new(&spec);
        Ok(Preprocessor { inner: Arc::new(Inner { spec, limits, normalizer }) })
    }

    pub fn spec(&self) -> &InputSpec {
        &self.inner.spec
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Decodes an image (format sniffed from the bytes) to upright RGB8, enforcing the limits.
    ///
    /// The result is tailored to this preprocessor's spec: a large JPEG comes back at reduced resolution
    /// ([`Decoded::dct_scale`]), still large enough that [`to_tensor`](Self::to_tensor) loses nothing.
    pub fn decode(&self, bytes: &[u8]) -> Result<Decoded, PreprocessError> {
        decode::decode(bytes, &self.inner.spec, &self.inner.limits)
    }

    /// Resizes `img` per the spec and normalizes it: `3 * width * height` values in the spec's layout and channel
    /// order. An empty (0-pixel) image yields the normalized `fill` colour everywhere.
    pub fn to_tensor(&self, img: &image::RgbImage) -> Vec<f32> {
        let plan = resize::plan(&self.inner.spec, img.width(), img.height());
        self.render(img, &plan, 1.0)
    }

    /// [`decode`](Self::decode) then [`to_tensor`](Self::to_tensor). Deterministic: the same bytes always give the
    /// same tensor on a given machine.
    pub fn prepare(&self, bytes: &[u8]) -> Result<Vec<f32>, PreprocessError> {
        let decoded = self.decode(bytes)?;
        // Geometry from the full-resolution size, so the crop/letterbox boxes do not shift with the DCT scale.
        let plan = resize::plan(&self.inner.spec, decoded.original_width, decoded.original_height);
        Ok(self.render(&decoded.image, &plan, 1.0 / f64::from(decoded.dct_scale)))
    }

    /// Reads and [`prepare`](Self::prepare)s an image file. The size limit is checked on the open file's metadata
    /// before anything is read, and enforced again while reading (the file may grow meanwhile).
    pub fn prepare_path(&self, path: &Path) -> Result<Vec<f32>, PreprocessError> {
        let io_err = |source| PreprocessError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(io_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")));
        }
        let limit = self.inner.limits.max_file_bytes;
        if meta.len() > limit {
            return Err(PreprocessError::FileTooLarge { bytes: meta.len(), limit });
        }
        // The metadata length is only a capacity hint: never trust it for more than the limit allows.
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(io_err)?;
        if bytes.len() as u64 > limit {
            return Err(PreprocessError::FileTooLarge { bytes: bytes.len() as u64, limit });
        }
        self.prepare(&bytes)
    }

    /// Stacks tensors from [`to_tensor`](Self::to_tensor)/[`prepare`](Self::prepare) into a batch:
    /// `[N, 3, H, W]` for NCHW, `[N, H, W, 3]` for NHWC.
    ///
    /// # Panics
    /// If an item does not have `3 * width * height` values, i.e. was not produced for this spec.
    pub fn batch(&self, items: &[Vec<f32>]) -> Array4<f32> {
        let spec = &self.inner.spec;
        let (w, h) = (spec.width as usize, spec.height as usize);
        let len = spec.tensor_len();
        let mut data = Vec::with_capacity(items.len() * len);
        for (i, item) in items.iter().enumerate() {
            assert_eq!(item.len(), len, "batch item {i} has {} values, expected 3x{w}x{h} = {len}", item.len());
            data.extend_from_slice(item);
        }
        let shape = match spec.layout {
            Layout::Nchw => (items.len(), 3, h, w),
            Layout::Nhwc => (items.len(), h, w, 3),
        };
        // Invariant: every item was checked to hold exactly one image of this shape.
        Array4::from_shape_vec(shape, data).expect("batch length matches its shape")
    }

    fn render(&self, img: &image::RgbImage, plan: &resize::Plan, src_scale: f64) -> Vec<f32> {
        let inner = &*self.inner;
        let mut out = vec![0.0; inner.spec.tensor_len()];
        resize::render(&inner.spec, &inner.normalizer, img, plan, src_scale, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}

    #[test]
    fn preprocessor_is_shareable() {
        assert_send_sync_clone::<Preprocessor>();
    }

    #[test]
    fn new_rejects_invalid_spec_and_limits() {
        let bad = InputSpec { width: 0, ..InputSpec::imagenet(224, 224) };
        assert!(matches!(Preprocessor::new(bad, Limits::default()), Err(PreprocessError::InvalidSpec(_))));
        let bad = Limits { max_pixels: 0, ..Limits::default() };
        let err = Preprocessor::new(InputSpec::imagenet(224, 224), bad).unwrap_err();
        assert!(matches!(err, PreprocessError::InvalidLimits(_)));
    }

    fn letterbox(w: u32, h: u32, layout: Layout, order: ChannelOrder) -> Preprocessor {
        let spec = InputSpec {
            width: w,
            height: h,
            resize: ResizeMode::Letterbox,
            crop_fraction: 1.0,
            interpolation: Interpolation::Nearest,
            fill: [10, 20, 30],
            mean: [0.0; 3],
            std: [1.0; 3],
            channel_order: order,
            layout,
        };
        Preprocessor::new(spec, Limits::default()).unwrap()
    }

    /// Values back to bytes, for readable assertions.
    fn bytes(t: &[f32]) -> Vec<u8> {
        t.iter().map(|v| (v * 255.0).round() as u8).collect()
    }

    #[test]
    fn layouts_and_channel_orders_place_every_value() {
        // A 1x2 image letterboxed into 3x2: the content keeps its size and lands in the middle column.
        let img = RgbImage::from_fn(1, 2, |_, y| if y == 0 { Rgb([1, 2, 3]) } else { Rgb([4, 5, 6]) });
        let f = [10, 20, 30];
        let nchw = bytes(&letterbox(3, 2, Layout::Nchw, ChannelOrder::Rgb).to_tensor(&img));
        #[rustfmt::skip]
        assert_eq!(nchw, [
            f[0], 1, f[0], f[0], 4, f[0],
            f[1], 2, f[1], f[1], 5, f[1],
            f[2], 3, f[2], f[2], 6, f[2],
        ]);
        let nhwc_bgr = bytes(&letterbox(3, 2, Layout::Nhwc, ChannelOrder::Bgr).to_tensor(&img));
        #[rustfmt::skip]
        assert_eq!(nhwc_bgr, [
            30, 20, 10,  3, 2, 1,  30, 20, 10,
            30, 20, 10,  6, 5, 4,  30, 20, 10,
        ]);
    }

    #[test]
    fn empty_image_gives_fill() {
        let pp = letterbox(2, 2, Layout::Nchw, ChannelOrder::Rgb);
        let t = bytes(&pp.to_tensor(&RgbImage::new(0, 0)));
        assert_eq!(t, [10, 10, 10, 10, 20, 20, 20, 20, 30, 30, 30, 30]);
    }

    #[test]
    fn batch_shapes() {
        let pp = letterbox(3, 2, Layout::Nchw, ChannelOrder::Rgb);
        let img = RgbImage::from_pixel(5, 5, Rgb([9, 9, 9]));
        let t = pp.to_tensor(&img);
        let b = pp.batch(&[t.clone(), t.clone()]);
        assert_eq!(b.shape(), &[2, 3, 2, 3]);
        assert_eq!(b.as_slice().unwrap()[18..], t[..]);
        let pp = letterbox(3, 2, Layout::Nhwc, ChannelOrder::Rgb);
        assert_eq!(pp.batch(&[pp.to_tensor(&img)]).shape(), &[1, 2, 3, 3]);
        assert_eq!(pp.batch(&[]).shape(), &[0, 2, 3, 3]);
    }

    #[test]
    #[should_panic(expected = "batch item 1 has 5 values")]
    fn batch_rejects_foreign_tensors() {
        let pp = letterbox(3, 2, Layout::Nchw, ChannelOrder::Rgb);
        pp.batch(&[vec![0.0; 18], vec![0.0; 5]]);
    }
}
