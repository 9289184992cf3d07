//! RGB8 image → normalized `f32` tensor: resize geometry per [`ResizeMode`] (documented in the
//! [module root](super#geometry)), resampling with fast_image_resize, normalization through a lookup table.

use super::spec::{ChannelOrder, InputSpec, Interpolation, Layout, ResizeMode};
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

/// Where source pixels go: `src` is a box in source pixel coordinates `(left, top, width, height)`, resampled into
/// the `dst` rectangle `(x, y, width, height)` of the `spec.width`×`spec.height` output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Plan {
    pub src: [f64; 4],
    pub dst: [u32; 4],
}

impl Plan {
    /// Output pixels per source pixel, the larger of the two axes (> 1 means upscaling).
    pub fn scale(&self) -> f64 {
        let [_, _, sw, sh] = self.src;
        let [_, _, dw, dh] = self.dst;
        (f64::from(dw) / sw).max(f64::from(dh) / sh)
    }
}

fn round_half_up(v: f64) -> f64 {
    (v + 0.5).floor()
}

/// Geometry for a source of `width`×`height` pixels (both ≥ 1). See the module docs.
pub(crate) fn plan(spec: &InputSpec, width: u32, height: u32) -> Plan {
    let (tw, th) = (spec.width, spec.height);
    let (w, h) = (f64::from(width.max(1)), f64::from(height.max(1)));
    let full = [0.0, 0.0, w, h];
    match spec.resize {
        ResizeMode::Stretch => Plan { src: full, dst: [0, 0, tw, th] },
        ResizeMode::Letterbox => {
            let r = (f64::from(tw) / w).min(f64::from(th) / h);
            // The f64 → u32 casts saturate, and the values are within 1..=target anyway.
            let cw = (round_half_up(w * r) as u32).clamp(1, tw);
            let ch = (round_half_up(h * r) as u32).clamp(1, th);
            Plan { src: full, dst: [(tw - cw) / 2, (th - ch) / 2, cw, ch] }
        }
        ResizeMode::CenterCrop => {
            let r = (f64::from(tw) / w).max(f64::from(th) / h) / f64::from(spec.crop_fraction);
            // crop_fraction <= 1 keeps the box inside the image; min() only guards float noise.
            let (sw, sh) = ((f64::from(tw) / r).min(w), (f64::from(th) / r).min(h));
            Plan { src: [(w - sw) / 2.0, (h - sh) / 2.0, sw, sh], dst: [0, 0, tw, th] }
        }
    }
}

/// Largest JPEG DCT-domain reduction we use. jpeg-decoder 0.3's 1/8 path (DC coefficient only) divides without
/// rounding, which darkens every YCbCr sample by half a level on average: about -1.1 levels in red and -1.2 in
/// blue after colour conversion, a systematic shift between large (served) and small (trained) images. Its 1/4
/// IDCT rounds correctly and decodes only ~15 % slower, so we stop there. `jpeg_decoder_one_eighth_scale_is_biased`
/// in the integration tests measures the bias; when it starts failing, raise this to 8.
pub(crate) const MAX_DCT_REDUCTION: u8 = 4;

/// The largest JPEG DCT reduction (up to `max`: 8, 4, 2, or 1 for none) after which the resize step still only
/// downsamples, so the output is as sharp as from a full decode. `width`×`height` is the full-resolution, upright
/// size.
pub(crate) fn choose_dct_scale(spec: &InputSpec, width: u32, height: u32, max: u8) -> u8 {
    // Decoded sizes round up (partial blocks), so width/d is a lower bound of what the decoder delivers.
    let scale = plan(spec, width, height).scale();
    [8u8, 4, 2].into_iter().filter(|&d| d <= max).find(|&d| scale * f64::from(d) <= 1.0).unwrap_or(1)
}

/// Per-output-channel lookup tables from 8-bit sample to normalized value, plus the normalized fill colour.
#[derive(Debug, Clone)]
pub(crate) struct Normalizer {
    /// `lut[c][v]` for output channel `c` (after `channel_order`).
    lut: [[f32; 256]; 3],
    /// Which RGB byte feeds output channel `c`.
    source: [usize; 3],
    fill: [f32; 3],
}

impl Normalizer {
    pub fn new(spec: &InputSpec) -> Self {
        let source = match spec.channel_order {
            ChannelOrder::Rgb => [0, 1, 2],
            ChannelOrder::Bgr => [2, 1, 0],
        };
        // Same float32 operations, in the same order, as the numpy reference: (v / 255 - mean) / std.
        let lut = source.map(|s| std::array::from_fn(|v| (v as f32 / 255.0 - spec.mean[s]) / spec.std[s]));
        let fill = std::array::from_fn(|c| lut[c][usize::from(spec.fill[source[c]])]);
        Normalizer { lut, source, fill }
    }
}

fn resize_alg(interpolation: Interpolation) -> ResizeAlg {
    match interpolation {
        Interpolation::Nearest => ResizeAlg::Nearest,
        Interpolation::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
        Interpolation::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
        Interpolation::Lanczos3 => ResizeAlg::Convolution(FilterType::Lanczos3),
    }
}

/// Resamples `img` per `plan` and writes the normalized tensor into `out` (`spec.tensor_len()` values).
///
/// `plan` may be computed for a larger "original" image of which `img` is a `src_scale` reduction (a JPEG decoded
/// at 1/8 has `src_scale` 0.125): the source box is scaled accordingly, so geometry does not depend on the DCT
/// scale that happened to be used.
pub(crate) fn render(
    spec: &InputSpec,
    norm: &Normalizer,
    img: &RgbImage,
    plan: &Plan,
    src_scale: f64,
    out: &mut [f32],
) {
    let (tw, th) = (spec.width as usize, spec.height as usize);
    debug_assert_eq!(out.len(), 3 * tw * th);
    let [x0, y0, cw, ch] = plan.dst.map(|v| v as usize);
    if img.width() == 0 || img.height() == 0 {
        // Nothing to draw: a well-defined all-fill tensor rather than a panic on a caller's empty image.
        fill_all(spec.layout, norm, out);
        return;
    }
    if (cw, ch) != (tw, th) {
        fill_all(spec.layout, norm, out);
    }

    let resized = resample(spec.interpolation, img, plan, src_scale);
    let buf = resized.buffer();
    let [s0, s1, s2] = norm.source;
    let [l0, l1, l2] = &norm.lut;
    match spec.layout {
        Layout::Nchw => {
            let plane = tw * th;
            let (p0, rest) = out.split_at_mut(plane);
            let (p1, p2) = rest.split_at_mut(plane);
            for (y, row) in buf.chunks_exact(cw * 3).enumerate() {
                let start = (y0 + y) * tw + x0;
                let range = start..start + cw;
                for (((px, o0), o1), o2) in
                    row.chunks_exact(3).zip(&mut p0[range.clone()]).zip(&mut p1[range.clone()]).zip(&mut p2[range])
                {
                    *o0 = l0[usize::from(px[s0])];
                    *o1 = l1[usize::from(px[s1])];
                    *o2 = l2[usize::from(px[s2])];
                }
            }
        }
        Layout::Nhwc => {
            for (y, row) in buf.chunks_exact(cw * 3).enumerate() {
                let start = ((y0 + y) * tw + x0) * 3;
                for (px, o) in row.chunks_exact(3).zip(out[start..start + cw * 3].chunks_exact_mut(3)) {
                    o[0] = l0[usize::from(px[s0])];
                    o[1] = l1[usize::from(px[s1])];
                    o[2] = l2[usize::from(px[s2])];
                }
            }
        }
    }
}

fn fill_all(layout: Layout, norm: &Normalizer, out: &mut [f32]) {
    match layout {
        Layout::Nchw => {
            let plane = out.len() / 3;
            for (c, chunk) in out.chunks_exact_mut(plane.max(1)).enumerate().take(3) {
                chunk.fill(norm.fill[c]);
            }
        }
        Layout::Nhwc => {
            for px in out.chunks_exact_mut(3) {
                px.copy_from_slice(&norm.fill);
            }
        }
    }
}

/// The source box of `plan`, scaled by `src_scale` and clamped into `img` exactly as fast_image_resize demands
/// (`left < width`, `left + width <= image width`).
fn source_box(plan: &Plan, src_scale: f64, img_w: u32, img_h: u32) -> [f64; 4] {
    let axis = |start: f64, len: f64, size: u32| {
        let size = f64::from(size);
        let mut start = (start * src_scale).clamp(0.0, size);
        if start >= size {
            start = 0.0;
        }
        let mut len = (len * src_scale).min(size - start);
        if start + len > size {
            len = len.next_down();
        }
        if len <= 0.0 {
            // Degenerate (sub-pixel) box: use the whole axis rather than resample nothing.
            return (0.0, size);
        }
        (start, len)
    };
    let [l, t, w, h] = plan.src;
    let (l, w) = axis(l, w, img_w);
    let (t, h) = axis(t, h, img_h);
    [l, t, w, h]
}

fn resample(interpolation: Interpolation, img: &RgbImage, plan: &Plan, src_scale: f64) -> Image<'static> {
    let [_, _, cw, ch] = plan.dst;
    let [l, t, w, h] = source_box(plan, src_scale, img.width(), img.height());
    let mut dst = Image::new(cw, ch, PixelType::U8x3);
    // Invariant: an RgbImage's buffer is exactly width*height*3 bytes and U8x3 needs no alignment.
    let src = ImageRef::new(img.width(), img.height(), img.as_raw(), PixelType::U8x3)
        .expect("RgbImage buffer matches its dimensions");
    let options = ResizeOptions::new().resize_alg(resize_alg(interpolation)).crop(l, t, w, h);
    // Invariants: same pixel type on both sides, and `source_box` keeps the crop inside the source, which are the
    // only ways fast_image_resize can fail.
    Resizer::new().resize(&src, &mut dst, &options).expect("crop box inside the source image");
    dst
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::spec::InputSpec;

    fn spec(mode: ResizeMode, w: u32, h: u32) -> InputSpec {
        InputSpec { resize: mode, crop_fraction: 1.0, ..InputSpec::imagenet(w, h) }
    }

    #[test]
    fn letterbox_geometry() {
        let s = spec(ResizeMode::Letterbox, 224, 224);
        assert_eq!(plan(&s, 600, 800).dst, [28, 0, 168, 224]);
        assert_eq!(plan(&s, 800, 600).dst, [0, 28, 224, 168]);
        assert_eq!(plan(&s, 100, 100).dst, [0, 0, 224, 224]);
        // Extreme panorama: never a zero-height strip.
        assert_eq!(plan(&s, 10_000, 10).dst, [0, 111, 224, 1]);
        assert_eq!(plan(&s, 600, 800).src, [0.0, 0.0, 600.0, 800.0]);
    }

    #[test]
    fn center_crop_geometry() {
        let mut s = spec(ResizeMode::CenterCrop, 224, 224);
        s.crop_fraction = 0.875;
        // torchvision: Resize(256) on 600x800 -> 256x341, CenterCrop(224): the crop is 224/256 of the short side.
        let p = plan(&s, 600, 800);
        assert_eq!(p.dst, [0, 0, 224, 224]);
        let [l, t, w, h] = p.src;
        assert!((w - 525.0).abs() < 1e-9 && (h - 525.0).abs() < 1e-9, "{:?}", p.src);
        assert!((l - 37.5).abs() < 1e-9 && (t - 137.5).abs() < 1e-9, "{:?}", p.src);
        // crop_fraction 1 keeps the whole short side.
        s.crop_fraction = 1.0;
        let src = plan(&s, 600, 800).src;
        for (got, want) in src.iter().zip([0.0, 100.0, 600.0, 600.0]) {
            assert!((got - want).abs() < 1e-9, "{src:?}");
        }
        // Non-square target on a landscape image.
        let s = spec(ResizeMode::CenterCrop, 300, 100);
        assert_eq!(plan(&s, 600, 600).src, [0.0, 200.0, 600.0, 200.0]);
    }

    #[test]
    fn dct_scale_choice() {
        let mut s = spec(ResizeMode::CenterCrop, 224, 224);
        s.crop_fraction = 0.875;
        let choose = |s: &InputSpec, w, h| choose_dct_scale(s, w, h, 8);
        // 24 MP studio photo: 1/8 still leaves 530 px on the short side, more than the 256 needed.
        assert_eq!(choose(&s, 4240, 5664), 8);
        // 256*8 = 2048 is the boundary for 1/8, 256*4 for 1/4.
        assert_eq!(choose(&s, 2048, 3000), 8);
        assert_eq!(choose(&s, 2047, 3000), 4);
        assert_eq!(choose(&s, 1024, 1024), 4);
        assert_eq!(choose(&s, 1023, 1024), 2);
        assert_eq!(choose(&s, 511, 1024), 1);
        // Upscaling sources are never reduced.
        assert_eq!(choose(&s, 60, 80), 1);
        // Stretch needs both axes: a wide image limited by its height.
        let st = spec(ResizeMode::Stretch, 224, 224);
        assert_eq!(choose(&st, 8000, 900), 4);
        // Letterbox only needs the fitting axis.
        let lb = spec(ResizeMode::Letterbox, 224, 224);
        assert_eq!(choose(&lb, 8000, 900), 8);
        // The cap.
        assert_eq!(choose_dct_scale(&s, 4240, 5664, MAX_DCT_REDUCTION), 4);
        assert_eq!(choose_dct_scale(&s, 4240, 5664, 1), 1);
    }

    #[test]
    fn normalizer_maps_channels_and_fill() {
        let mut s = InputSpec::imagenet(2, 2);
        s.fill = [255, 0, 0];
        s.channel_order = ChannelOrder::Bgr;
        let n = Normalizer::new(&s);
        // Output channel 0 is blue: 0 in the fill colour.
        assert_eq!(n.source, [2, 1, 0]);
        assert_eq!(n.fill[0], (0.0 - 0.406) / 0.225);
        assert_eq!(n.fill[2], (1.0 - 0.485) / 0.229);
        assert_eq!(n.lut[2][255], (255.0f32 / 255.0 - 0.485) / 0.229);
    }

    #[test]
    fn source_box_stays_inside() {
        let p = Plan { src: [0.0, 0.0, 6001.0, 4001.0], dst: [0, 0, 10, 10] };
        // 6001x4001 decoded at 1/8 is 751x501 (ceil); the scaled box is 750.125 wide.
        let [l, t, w, h] = source_box(&p, 0.125, 751, 501);
        assert_eq!([l, t], [0.0, 0.0]);
        assert!(l + w <= 751.0 && t + h <= 501.0 && w > 750.0 && h > 500.0);
        // A box past the edge is clamped, never rejected.
        let p = Plan { src: [5.0, 5.0, 100.0, 100.0], dst: [0, 0, 10, 10] };
        let [l, t, w, h] = source_box(&p, 1.0, 50, 50);
        assert_eq!([l, t, w, h], [5.0, 5.0, 45.0, 45.0]);
    }
}
