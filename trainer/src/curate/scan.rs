//! Image scanning: read, hash, decode with the daemon's decoder, check, and compute the near-duplicate signatures.
//! Runs on rayon's pool with a progress bar on stderr.

use super::Reason;
use super::schema::ImageChecks;
use attrd::preprocess::{InputSpec, Interpolation, Limits, PreprocessError, Preprocessor, ResizeMode};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// What curation needs to know about one valid image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageInfo {
    /// SHA-256 of the file.
    pub sha256: [u8; 32],
    /// Size as displayed (after EXIF orientation), from the header.
    pub width: u32,
    pub height: u32,
    /// Difference hash: bit `16 * y + x` is set when grey pixel `(x + 1, y)` of a 17×16 thumbnail is brighter than
    /// pixel `(x, y)`; bit `i` lives in word `i / 64`, bit `i % 64`.
    pub dhash: [u64; 4],
    /// 32×32 grey thumbnail, row-major.
    pub thumb: [u8; THUMB_LEN],
}

/// The outcome of scanning one image.
#[derive(Debug, Clone)]
pub(crate) enum Scanned {
    Valid(Box<ImageInfo>),
    Invalid { reason: Reason, detail: String },
}

/// The decoder configuration. The target size only steers JPEG DCT downscaling for very large photos (the decode
/// stays at least 256 pixels on the short side, plenty for 16×16 signatures); small catalog images decode at full
/// size.
fn preprocessor(checks: &ImageChecks) -> Preprocessor {
    let spec = InputSpec {
        width: 256,
        height: 256,
        resize: ResizeMode::Letterbox,
        crop_fraction: 1.0,
        interpolation: Interpolation::Bilinear,
        fill: [255, 255, 255],
        mean: [0.0; 3],
        std: [1.0; 3],
        channel_order: attrd::preprocess::ChannelOrder::Rgb,
        layout: attrd::preprocess::Layout::Nchw,
    };
    let limits = Limits { max_file_bytes: checks.max_file_bytes, max_pixels: checks.max_pixels };
    // Invariant: the spec above is valid and the schema checked that both limits are at least 1.
    Preprocessor::new(spec, limits).expect("fixed decode spec and checked limits are valid")
}

/// Scans every path in parallel; the result has one entry per path, in order.
pub(crate) fn scan_all(paths: &[PathBuf], checks: &ImageChecks, progress: bool) -> Vec<Scanned> {
    let pre = preprocessor(checks);
    let bar = if progress {
        ProgressBar::with_draw_target(Some(paths.len() as u64), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    // Invariant: the template is a fixed, valid indicatif template.
    let style = ProgressStyle::with_template("{prefix} {wide_bar} {pos}/{len} images (eta {eta})")
        .expect("valid progress template");
    bar.set_style(style);
    bar.set_prefix("scanning");
    let out: Vec<Scanned> = paths
        .par_iter()
        .map(|p| {
            let r = scan_one(p, &pre, checks);
            bar.inc(1);
            r
        })
        .collect();
    bar.finish_and_clear();
    out
}

/// Scans one image file.
pub(crate) fn scan_one(path: &Path, pre: &Preprocessor, checks: &ImageChecks) -> Scanned {
    let bytes = match read_limited(path, checks.max_file_bytes) {
        Ok(b) => b,
        Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Scanned::Invalid {
                reason: Reason::MissingFile,
                detail: format!("{} does not exist", path.display()),
            };
        }
        Err(ReadError::Io(e)) => {
            return Scanned::Invalid { reason: Reason::Unreadable, detail: attrd::util::error_chain(&e) };
        }
        Err(ReadError::TooLarge(len)) => {
            return Scanned::Invalid {
                reason: Reason::TooLarge,
                detail: format!("{len} bytes, over the {} byte limit", checks.max_file_bytes),
            };
        }
    };
    let sha256: [u8; 32] = Sha256::digest(&bytes).into();
    let decoded = match pre.decode(&bytes) {
        Ok(d) => d,
        Err(e) => {
            let reason = match &e {
                PreprocessError::Truncated { .. } => Reason::Truncated,
                PreprocessError::TooManyPixels { .. } | PreprocessError::FileTooLarge { .. } => Reason::TooLarge,
                _ => Reason::Undecodable,
            };
            return Scanned::Invalid { reason, detail: attrd::util::error_chain(&e) };
        }
    };
    let (width, height) = (decoded.original_width, decoded.original_height);
    if width.min(height) < checks.min_side {
        return Scanned::Invalid {
            reason: Reason::TooSmall,
            detail: format!("{width}x{height}, smaller than {} pixels on a side", checks.min_side),
        };
    }
    let content = content_fraction(&decoded.image, checks.blank_tolerance);
    if content < checks.blank_min_content {
        return Scanned::Invalid {
            reason: Reason::Blank,
            detail: format!(
                "{:.3}% of pixels differ from the background colour by more than {} (minimum {:.3}%)",
                content * 100.0,
                checks.blank_tolerance,
                checks.blank_min_content * 100.0
            ),
        };
    }
    let (dhash, thumb) = signatures(&decoded.image);
    Scanned::Valid(Box::new(ImageInfo { sha256, width, height, dhash, thumb }))
}

enum ReadError {
    Io(std::io::Error),
    TooLarge(u64),
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let file = std::fs::File::open(path).map_err(ReadError::Io)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    if !meta.is_file() {
        return Err(ReadError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")));
    }
    if meta.len() > limit {
        return Err(ReadError::TooLarge(meta.len()));
    }
    // The metadata length is only a capacity hint; the limit is enforced on what is actually read.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Fraction of pixels with a channel more than `tolerance` away from the image's per-channel median (the
/// background of a catalog photo, or the one colour of a blank image).
pub(crate) fn content_fraction(img: &image::RgbImage, tolerance: u8) -> f64 {
    let raw = img.as_raw();
    let n = raw.len() / 3;
    if n == 0 {
        return 0.0;
    }
    // Plain loops over the raw bytes: these run for every image, and tests run them unoptimized.
    let mut hist = [[0usize; 256]; 3];
    for px in raw.chunks_exact(3) {
        hist[0][px[0] as usize] += 1;
        hist[1][px[1] as usize] += 1;
        hist[2][px[2] as usize] += 1;
    }
    let mut median = [0u8; 3];
    for (c, h) in hist.iter().enumerate() {
        let mut seen = 0;
        for (v, &count) in h.iter().enumerate() {
            seen += count;
            if seen * 2 >= n {
                median[c] = v as u8;
                break;
            }
        }
    }
    let (lo, hi): (Vec<u8>, Vec<u8>) =
        median.iter().map(|&m| (m.saturating_sub(tolerance), m.saturating_add(tolerance))).unzip();
    let mut content = 0usize;
    for px in raw.chunks_exact(3) {
        let outside = |c: usize| px[c] < lo[c] || px[c] > hi[c];
        if outside(0) || outside(1) || outside(2) {
            content += 1;
        }
    }
    content as f64 / n as f64
}

/// Side of the thumbnail whose correlation confirms a near duplicate. 16×16 blurs wallets (or ties) of one shape
/// into the same picture; 32×32 keeps their clasps and prints apart while shade variants of one photo still
/// correlate above 0.99.
pub(crate) const THUMB_SIDE: usize = 32;
pub(crate) const THUMB_LEN: usize = THUMB_SIDE * THUMB_SIDE;

/// The 256-bit difference hash and the 32×32 grey thumbnail of an image.
pub(crate) fn signatures(img: &image::RgbImage) -> ([u64; 4], [u8; THUMB_LEN]) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    // Rec. 601 luma in integers, as JPEG defines it.
    let grey: Vec<f32> = img
        .as_raw()
        .chunks_exact(3)
        .map(|p| ((299 * u32::from(p[0]) + 587 * u32::from(p[1]) + 114 * u32::from(p[2]) + 500) / 1000) as f32)
        .collect();
    let wide = area_resize(&grey, w, h, 17, 16);
    let mut dhash = [0u64; 4];
    for y in 0..16 {
        for x in 0..16 {
            if wide[y * 17 + x + 1] > wide[y * 17 + x] {
                let bit = 16 * y + x;
                dhash[bit / 64] |= 1 << (bit % 64);
            }
        }
    }
    let small = area_resize(&grey, w, h, THUMB_SIDE, THUMB_SIDE);
    let mut thumb = [0u8; THUMB_LEN];
    thumb.copy_from_slice(&small);
    (dhash, thumb)
}

/// Per output cell: the first source index and the weights of the source cells it covers (summing to 1).
fn area_weights(src: usize, dst: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|o| {
            let (a, b) = (o as f64 * scale, (o + 1) as f64 * scale);
            let first = a.floor() as usize;
            let last = (b.ceil() as usize).min(src).max(first + 1);
            let weights =
                (first..last).map(|i| ((b.min(i as f64 + 1.0) - a.max(i as f64)).max(0.0) / scale) as f32).collect();
            (first, weights)
        })
        .collect()
}

/// Area-average resampling (every source pixel contributes in proportion to its overlap), rounded to 8 bits so that
/// the difference hash compares exact values: on a white background equal neighbours must stay equal, not differ
/// by float noise. Also upsamples (then it is a box filter). A hand-written loop because the `image` crate's
/// generic resize is compiled with this crate's settings, and unoptimized it dominated curation in tests.
fn area_resize(src: &[f32], w: usize, h: usize, ow: usize, oh: usize) -> Vec<u8> {
    let (xw, yw) = (area_weights(w, ow), area_weights(h, oh));
    // Horizontal pass: h rows of ow values.
    let mut rows = vec![0f32; h * ow];
    for y in 0..h {
        let line = &src[y * w..(y + 1) * w];
        for (ox, (first, weights)) in xw.iter().enumerate() {
            let mut acc = 0f32;
            for (k, wt) in weights.iter().enumerate() {
                acc += line[first + k] * wt;
            }
            rows[y * ow + ox] = acc;
        }
    }
    let mut out = vec![0u8; ow * oh];
    for (oy, (first, weights)) in yw.iter().enumerate() {
        for ox in 0..ow {
            let mut acc = 0f32;
            for (k, wt) in weights.iter().enumerate() {
                acc += rows[(first + k) * ow + ox] * wt;
            }
            out[oy * ow + ox] = acc.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curate::schema::DuplicateConfig;
    use image::{Rgb, RgbImage};

    fn checks() -> ImageChecks {
        ImageChecks::default()
    }

    fn jpeg(img: &RgbImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    fn product(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let inside = (10..w - 10).contains(&x) && (15..h - 15).contains(&y);
            if inside { Rgb([(x * 4) as u8, 40, (y * 3) as u8]) } else { Rgb([255, 255, 255]) }
        })
    }

    #[test]
    fn broken_images_get_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let pre = preprocessor(&checks());
        let good = jpeg(&product(60, 80));
        let cases: Vec<(&str, Vec<u8>, Option<Reason>)> = vec![
            ("good.jpg", good.clone(), None),
            ("truncated.jpg", good[..good.len() / 2].to_vec(), Some(Reason::Truncated)),
            (
                "random.jpg",
                (0..3000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect(),
                Some(Reason::Undecodable),
            ),
            ("tiny.jpg", jpeg(&product(24, 24).sub_image_owned(4, 4)), Some(Reason::TooSmall)),
            ("white.jpg", jpeg(&RgbImage::from_pixel(60, 80, Rgb([255, 255, 255]))), Some(Reason::Blank)),
            ("empty.jpg", Vec::new(), Some(Reason::Undecodable)),
        ];
        for (name, bytes, want) in &cases {
            std::fs::write(dir.path().join(name), bytes).unwrap();
            let got = scan_one(&dir.path().join(name), &pre, &checks());
            match (got, want) {
                (Scanned::Valid(info), None) => {
                    assert_eq!((info.width, info.height), (60, 80));
                    assert_eq!(info.sha256, <[u8; 32]>::from(Sha256::digest(bytes)));
                }
                (Scanned::Invalid { reason, detail }, Some(want)) => assert_eq!(reason, *want, "{name}: {detail}"),
                (other, want) => panic!("{name}: got {other:?}, want {want:?}"),
            }
        }
        let missing = scan_one(&dir.path().join("nope.jpg"), &pre, &checks());
        assert!(matches!(missing, Scanned::Invalid { reason: Reason::MissingFile, .. }), "{missing:?}");
        let small = ImageChecks { max_file_bytes: 100, ..checks() };
        let big = scan_one(&dir.path().join("good.jpg"), &preprocessor(&small), &small);
        assert!(matches!(big, Scanned::Invalid { reason: Reason::TooLarge, .. }), "{big:?}");
    }

    trait SubImage {
        fn sub_image_owned(&self, w: u32, h: u32) -> RgbImage;
    }
    impl SubImage for RgbImage {
        fn sub_image_owned(&self, w: u32, h: u32) -> RgbImage {
            image::imageops::crop_imm(self, 8, 8, w, h).to_image()
        }
    }

    #[test]
    fn area_resize_averages_by_overlap() {
        // 4 -> 2 averages pairs; 3 -> 2 gives the middle pixel half to each side.
        assert_eq!(area_resize(&[0.0, 10.0, 20.0, 30.0], 4, 1, 2, 1), [5, 25]);
        assert_eq!(area_resize(&[0.0, 30.0, 90.0], 3, 1, 2, 1), [10, 70]);
        // Both axes: a 2x2 block average, and upsampling repeats pixels.
        assert_eq!(area_resize(&[0.0, 100.0, 50.0, 250.0], 2, 2, 1, 1), [100]);
        assert_eq!(area_resize(&[7.0, 9.0], 2, 1, 4, 1), [7, 7, 9, 9]);
        // A white background stays exactly white (no float noise to flip hash bits).
        assert!(area_resize(&[255.0; 60 * 80], 60, 80, 17, 16).iter().all(|&v| v == 255));
    }

    #[test]
    fn blank_detection_keeps_faint_items() {
        let white = RgbImage::from_pixel(60, 80, Rgb([250, 250, 250]));
        assert_eq!(content_fraction(&white, 16), 0.0);
        // A thin faint chain: 40 pixels 30 levels darker than the background is content, not blankness.
        let mut chain = white.clone();
        for i in 0..40 {
            chain.put_pixel(10 + i % 40, 10 + i, Rgb([220, 215, 200]));
        }
        assert!(content_fraction(&chain, 16) > 0.001);
        // JPEG noise of a few levels is not content.
        let noisy = RgbImage::from_fn(60, 80, |x, y| Rgb([245 + ((x + y) % 5) as u8; 3]));
        assert_eq!(content_fraction(&noisy, 16), 0.0);
    }

    #[test]
    fn signatures_survive_recompression_and_tell_products_apart() {
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo-images");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&demo).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        assert!(files.len() >= 10, "demo photos missing from {}", demo.display());
        let dist = |x: &[u64; 4], y: &[u64; 4]| crate::curate::dedup::hamming(x, y);
        let corr = crate::curate::dedup::correlation;
        let d = DuplicateConfig::default();
        let sigs: Vec<([u64; 4], [u8; THUMB_LEN])> = files
            .iter()
            .map(|f| {
                let img = image::open(f).unwrap().to_rgb8();
                // A re-encoded copy at another quality, the way a catalog re-uploads the same photo.
                let mut again = std::io::Cursor::new(Vec::new());
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut again, 75).encode_image(&img).unwrap();
                let copy = image::load_from_memory(again.get_ref()).unwrap().to_rgb8();
                let (a, b) = (signatures(&img), signatures(&copy));
                let (h, c) = (dist(&a.0, &b.0), corr(&a.1, &b.1));
                assert!(
                    h <= d.near_max_distance && c >= d.near_min_correlation,
                    "{}: copy at {h} bits, r = {c}",
                    f.display()
                );
                a
            })
            .collect();
        // Different products (even two blue cricket jerseys) are not near duplicates.
        for i in 0..sigs.len() {
            for j in i + 1..sigs.len() {
                let (h, c) = (dist(&sigs[i].0, &sigs[j].0), corr(&sigs[i].1, &sigs[j].1));
                assert!(
                    h > d.near_max_distance || c < d.near_min_correlation,
                    "{:?} ~ {:?}: {h} bits, r = {c}",
                    files[i],
                    files[j]
                );
            }
        }
    }
}
