//! Shared preprocessing on real catalogue photos: every fixture's outcome, pixel agreement with Pillow, DCT-domain
//! downscaling of a large JPEG, limits, spec serde. Fixtures come from `scripts/make-image-fixtures.py`.

use attrd::preprocess::{
    ChannelOrder, Codec, Decoded, ImageKind, InputSpec, Interpolation, Layout, Limits, PreprocessError, Preprocessor,
    ResizeMode,
};
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Built with the (default) `turbojpeg` feature: ordinary JPEGs go through libjpeg-turbo.
const TURBO: bool = cfg!(feature = "turbojpeg");

/// The largest DCT reduction the JPEG decoder in use applies (see `resize::MAX_DCT_REDUCTION`).
const MAX_DCT: u8 = if TURBO { 8 } else { 4 };

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images").join(name)
}

fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn letterbox_spec(width: u32, height: u32) -> InputSpec {
    InputSpec {
        resize: ResizeMode::Letterbox,
        crop_fraction: 1.0,
        interpolation: Interpolation::Bilinear,
        ..InputSpec::imagenet(width, height)
    }
}

/// The daemon's typical configuration; only the fill colour (white) matters for decoding the small fixtures.
fn pp() -> Preprocessor {
    Preprocessor::new(letterbox_spec(224, 224), Limits::default()).unwrap()
}

fn decode(name: &str) -> Decoded {
    pp().decode(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e:?}"))
}

/// Decoded with Pillow-independent, format-agnostic code: the `image` crate, for ground-truth PNGs.
fn png_rgb(name: &str) -> RgbImage {
    let img = image::load_from_memory_with_format(&fixture(name), image::ImageFormat::Png).unwrap();
    assert!(!img.color().has_alpha(), "{name} is meant to be an opaque reference");
    img.into_rgb8()
}

/// Mean and max absolute difference of two same-sized images, in 8-bit levels.
fn diff(a: &RgbImage, b: &RgbImage) -> (f64, u8) {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let (mut sum, mut max) = (0u64, 0u8);
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        sum += u64::from(d);
        max = max.max(d);
    }
    (sum as f64 / a.as_raw().len() as f64, max)
}

// ------------------------------------------------------------------------------------------------------------------
// Every fixture's outcome

#[test]
fn good_fixtures_decode_with_format_size_and_orientation() {
    use ImageKind::*;
    // (file, format, width, height, orientation): sizes are as displayed, i.e. after EXIF rotation.
    let cases = [
        ("photo.jpg", Jpeg, 60, 80, 1),
        ("progressive.jpg", Jpeg, 60, 80, 1),
        ("shoe.jpg", Jpeg, 60, 80, 1),
        ("cmyk.jpg", Jpeg, 60, 80, 1),
        ("gray.jpg", Jpeg, 60, 80, 1),
        ("exif-3.jpg", Jpeg, 60, 80, 3),
        ("exif-6.jpg", Jpeg, 60, 80, 6),
        ("exif-8.jpg", Jpeg, 60, 80, 8),
        ("photo.png", Png, 60, 80, 1),
        ("gray.png", Png, 60, 80, 1),
        ("gray16.png", Png, 60, 80, 1),
        ("rgb16.png", Png, 60, 80, 1),
        ("rgba.png", Png, 60, 80, 1),
        ("la.png", Png, 60, 80, 1),
        ("palette.png", Png, 60, 80, 1),
        ("exif-6.png", Png, 60, 80, 6),
        ("photo.webp", Webp, 60, 80, 1),
        ("lossy.webp", Webp, 60, 80, 1),
        ("rgba.webp", Webp, 60, 80, 1),
        ("exif-5.webp", Webp, 60, 80, 5),
    ];
    for (name, format, w, h, orientation) in cases {
        let d = decode(name);
        assert_eq!(d.format, format, "{name}");
        assert_eq!(d.image.dimensions(), (w, h), "{name}");
        assert_eq!((d.original_width, d.original_height), (w, h), "{name}");
        assert_eq!(d.orientation, orientation, "{name}");
        assert_eq!(d.dct_scale, 1, "{name}: a 60x80 photo is never reduced for a 224 target");
        let codec = match format {
            Png | Webp => Codec::Image,
            // libjpeg-turbo leaves CMYK to jpeg-decoder, which converts it the way Pillow does.
            Jpeg if name == "cmyk.jpg" || !TURBO => Codec::JpegDecoder,
            Jpeg => Codec::LibjpegTurbo,
        };
        assert_eq!(d.codec, codec, "{name}");
        let t = pp().prepare(&fixture(name)).unwrap();
        assert_eq!(t.len(), 3 * 224 * 224, "{name}");
        assert!(t.iter().all(|v| v.is_finite()), "{name}");
    }
}

#[test]
fn broken_and_hostile_fixtures_give_specific_errors() {
    let pp = pp();
    let err = |name: &str| pp.decode(&fixture(name)).expect_err(name);

    assert!(matches!(err("empty.jpg"), PreprocessError::Empty));

    // Content decides, not the extension.
    let e = err("html-error.jpg");
    assert!(matches!(&e, PreprocessError::UnknownFormat { magic } if magic.contains("<!DOCTYPE ht")), "{e:?}");
    assert!(matches!(err("garbage.bin"), PreprocessError::UnknownFormat { .. }));

    for (name, format) in [
        ("truncated.jpg", ImageKind::Jpeg),
        ("truncated-eoi.jpg", ImageKind::Jpeg),
        ("truncated.png", ImageKind::Png),
        ("truncated.webp", ImageKind::Webp),
    ] {
        let len = fixture(name).len();
        match err(name) {
            PreprocessError::Truncated { format: f, len: l, source } => {
                assert_eq!((f, l), (format, len), "{name}");
                assert!(source.is_some(), "{name}: the decoder's own error is kept as the source");
            }
            other => panic!("{name}: expected Truncated, got {other:?}"),
        }
    }
    let e = err("truncated.jpg");
    assert_eq!(
        e.to_string(),
        format!("JPEG image is truncated: the data ends after {} bytes, before the image is complete", 1015)
    );

    // Decompression bombs: rejected from the header, before any pixel buffer exists.
    match err("bomb.png") {
        PreprocessError::TooManyPixels { width: 100_000, height: 100_000, limit: 100_000_000 } => {}
        other => panic!("bomb.png: {other:?}"),
    }
    let e = err("bomb.jpg");
    assert!(matches!(e, PreprocessError::TooManyPixels { width: 30_000, height: 30_000, .. }), "{e:?}");
    assert_eq!(e.to_string(), "image is 30000x30000 = 900.0 MP, over the 100 MP limit");
}

#[test]
fn corrupt_jpeg_reports_decode_error_with_source() {
    let mut bytes = fixture("photo.jpg");
    // Destroy the Huffman tables' marker: the stream is complete but no longer decodable.
    let dht = bytes.windows(2).position(|w| w == [0xff, 0xc4]).unwrap();
    bytes[dht + 1] = 0x00;
    let e = pp().decode(&bytes).unwrap_err();
    assert!(matches!(e, PreprocessError::Decode { format: ImageKind::Jpeg, .. }), "{e:?}");
    assert_eq!(e.to_string(), "could not decode JPEG image");
    assert!(std::error::Error::source(&e).is_some());
}

/// jpeg-decoder (and the PNG/WebP decoders) must never hand back a partially decoded image: every prefix of a real
/// file either fails or, when only trailing metadata is missing, decodes to exactly the full image.
#[test]
fn no_prefix_of_a_real_file_decodes_to_a_partial_image() {
    let pp = pp();
    for name in ["photo.jpg", "progressive.jpg", "cmyk.jpg", "photo.png", "photo.webp", "exif-6.jpg"] {
        let bytes = fixture(name);
        let full = pp.decode(&bytes).unwrap().image;
        let mut truncated = 0;
        // Every 3rd cut point, and all of the last 100 bytes where the end-of-image markers live.
        let cuts = (0..bytes.len()).step_by(3).chain(bytes.len().saturating_sub(100)..bytes.len());
        let mut tried = 0;
        for cut in cuts {
            tried += 1;
            match pp.decode(&bytes[..cut]) {
                Ok(d) => assert!(d.image == full, "{name} cut at {cut}/{} decoded to a partial image", bytes.len()),
                Err(PreprocessError::Truncated { .. }) => truncated += 1,
                Err(PreprocessError::Empty) => assert_eq!(cut, 0),
                Err(_) => {}
            }
        }
        // Almost every cut point is recognised as truncation specifically, not as generic corruption.
        assert!(truncated * 10 >= tried * 9, "{name}: only {truncated}/{tried} cuts reported as truncated");
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Pixel correctness of decoding

#[test]
fn lossless_variants_decode_to_identical_pixels() {
    let photo = png_rgb("photo.png");
    for name in ["photo.png", "rgb16.png", "photo.webp", "exif-6.png", "exif-5.webp"] {
        assert!(decode(name).image == photo, "{name} differs from photo.png");
    }
    let gray = decode("gray.png").image;
    assert!(gray.pixels().all(|p| p[0] == p[1] && p[1] == p[2]), "grey must expand to R=G=B");
    assert!(decode("gray16.png").image == gray, "16-bit grey differs from 8-bit grey");
}

#[test]
fn jpeg_decoding_matches_pillow() {
    // photo.png is Pillow's (libjpeg's) decoding of photo.jpg: the decoders may differ only by IDCT/upsampling
    // rounding.
    let photo = png_rgb("photo.png");
    let (mean, max) = diff(&decode("photo.jpg").image, &photo);
    assert!(mean < 1.5 && max <= 40, "photo.jpg vs Pillow: mean {mean:.3}, max {max}");
    // Progressive re-encode at q92: adds compression loss on top.
    let (mean, max) = diff(&decode("progressive.jpg").image, &photo);
    assert!(mean < 3.0 && max <= 60, "progressive.jpg vs Pillow: mean {mean:.3}, max {max}");
    let (mean, _) = diff(&decode("lossy.webp").image, &photo);
    assert!(mean < 4.0, "lossy.webp vs original: mean {mean:.3}");
}

#[test]
fn cmyk_jpeg_matches_pillow_and_the_rgb_original() {
    let cmyk = decode("cmyk.jpg").image;
    // Same file rendered by Pillow: validates the Adobe-inverted CMYK handling and the CMYK->RGB formula.
    let (mean, max) = diff(&cmyk, &png_rgb("cmyk.pillow.png"));
    assert!(mean < 1.5 && max <= 40, "cmyk.jpg vs Pillow: mean {mean:.3}, max {max}");
    // And the same photo as a normal RGB JPEG: a wrong inversion would be off by ~128 levels.
    let (mean, _) = diff(&cmyk, &decode("shoe.jpg").image);
    assert!(mean < 3.0, "cmyk.jpg vs shoe.jpg: mean {mean:.3}");
}

#[test]
fn grayscale_jpeg_is_grey_and_matches_its_source() {
    let gray = decode("gray.jpg").image;
    assert!(gray.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
    let (mean, _) = diff(&gray, &decode("gray.png").image);
    assert!(mean < 2.0, "gray.jpg vs gray.png: mean {mean:.3}");
}

#[test]
fn transparency_is_composited_over_the_fill_colour() {
    // The *.over-white.png references are composited in numpy; transparent pixels of rgba.png are black
    // underneath, so dropping alpha instead of compositing cannot pass.
    for (name, reference) in [
        ("rgba.png", "rgba.over-white.png"),
        ("rgba.webp", "rgba.over-white.png"),
        ("la.png", "la.over-white.png"),
        ("palette.png", "palette.over-white.png"),
    ] {
        let (mean, max) = diff(&decode(name).image, &png_rgb(reference));
        assert!(max == 0, "{name} vs {reference}: mean {mean:.3}, max {max}");
    }
    // The matte is the spec's fill colour, not hard-wired white.
    let spec = InputSpec { fill: [0, 128, 255], ..letterbox_spec(224, 224) };
    let blue = Preprocessor::new(spec, Limits::default()).unwrap();
    let img = blue.decode(&fixture("rgba.png")).unwrap().image;
    assert_eq!(img.get_pixel(0, 0).0, [0, 128, 255], "fully transparent corner");
    let white = decode("rgba.png").image;
    let centre = (30, 40); // on the shoe: opaque, unaffected by the matte
    assert_eq!(img.get_pixel(centre.0, centre.1), white.get_pixel(centre.0, centre.1));
}

#[test]
fn exif_orientation_restores_the_upright_photo() {
    let photo = png_rgb("photo.png");
    for name in ["exif-3.jpg", "exif-6.jpg", "exif-8.jpg"] {
        let (mean, max) = diff(&decode(name).image, &photo);
        assert!(mean < 2.5, "{name} vs upright photo: mean {mean:.3}, max {max}");
    }
    // The same pixels without the orientation applied are nowhere near: the comparison above has teeth.
    let stored =
        image::load_from_memory_with_format(&fixture("exif-3.jpg"), image::ImageFormat::Jpeg).unwrap().into_rgb8();
    let (mean, _) = diff(&stored, &photo);
    assert!(mean > 20.0, "stored exif-3.jpg pixels unexpectedly close to upright: {mean:.3}");
}

// ------------------------------------------------------------------------------------------------------------------
// Output tensors against Pillow + numpy

/// Reads a little-endian float32 `.npy` file (format version 1 or 2) into (shape, values).
fn read_npy(name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = fixture(name);
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{name}");
    let (header_len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"), "{header}");
    let shape_str = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> =
        shape_str.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
    let data: Vec<f32> =
        bytes[start + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(data.len(), shape.iter().product::<usize>(), "{name}");
    (shape, data)
}

#[derive(serde::Deserialize)]
struct ReferenceCase {
    name: String,
    input: String,
    spec: InputSpec,
    tensor: String,
}

#[test]
fn tensors_match_pillow_numpy_reference() {
    let cases: Vec<ReferenceCase> = serde_json::from_slice(&fixture("reference.json")).unwrap();
    assert!(cases.len() >= 7);
    let mut modes = std::collections::HashSet::new();
    for case in cases {
        let spec = &case.spec;
        modes.insert((spec.resize, spec.interpolation, spec.layout, spec.channel_order));
        let (shape, want) = read_npy(&case.tensor);
        let (w, h) = (spec.width as usize, spec.height as usize);
        let want_shape = match spec.layout {
            Layout::Nchw => vec![3, h, w],
            Layout::Nhwc => vec![h, w, 3],
        };
        assert_eq!(shape, want_shape, "{}", case.name);

        let pp = Preprocessor::new(spec.clone(), Limits::default()).unwrap();
        let got = pp.prepare(&fixture(&case.input)).unwrap();
        assert_eq!(got.len(), want.len(), "{}", case.name);
        // Tolerance in 8-bit levels: fast_image_resize and Pillow share kernels and geometry but not their
        // fixed-point precision, so 10-20 % of values come out 1 level apart (2 for Lanczos' negative lobes).
        // A wrong geometry, filter, layout or normalization is off by many levels almost everywhere.
        let level = |c: usize| 1.0 / (255.0 * spec.std[c] as f64);
        let channel = |i: usize| match spec.layout {
            Layout::Nchw => i / (w * h),
            Layout::Nhwc => i % 3,
        };
        let (mut sum, mut max, mut off) = (0.0f64, 0.0f64, 0usize);
        for (i, (g, r)) in got.iter().zip(&want).enumerate() {
            let c = channel(i);
            let src = if spec.channel_order == ChannelOrder::Bgr { 2 - c } else { c };
            let levels = (f64::from(*g) - f64::from(*r)).abs() / level(src);
            sum += levels;
            max = max.max(levels);
            if levels > 0.01 {
                off += 1;
            }
        }
        let mean = sum / got.len() as f64;
        eprintln!("{}: mean {mean:.4} levels, max {max:.3} levels, {off}/{} values off", case.name, got.len());
        assert!(max <= 2.01, "{}: max diff {max:.3} levels", case.name);
        assert!(mean <= 0.25, "{}: mean diff {mean:.4} levels", case.name);
    }
    assert!(modes.len() >= 6, "reference cases should cover several modes/filters/layouts");
}

#[test]
fn reference_cases_are_not_trivially_equal() {
    // Guards the reference test against a degenerate fixture set: swapping layout or channel order must change
    // the tensor far beyond the tolerance.
    let case = letterbox_spec(32, 32);
    let a = Preprocessor::new(case.clone(), Limits::default()).unwrap().prepare(&fixture("photo.png")).unwrap();
    let bgr = InputSpec { channel_order: ChannelOrder::Bgr, ..case.clone() };
    let b = Preprocessor::new(bgr, Limits::default()).unwrap().prepare(&fixture("photo.png")).unwrap();
    let nhwc = InputSpec { layout: Layout::Nhwc, ..case };
    let c = Preprocessor::new(nhwc, Limits::default()).unwrap().prepare(&fixture("photo.png")).unwrap();
    let mad = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| (a - b).abs()).sum::<f32>() / x.len() as f32;
    assert!(mad(&a, &b) > 0.1 && mad(&a, &c) > 0.1);
}

// ------------------------------------------------------------------------------------------------------------------
// DCT-domain downscaling of large JPEGs

/// A ~24 MP studio-sized JPEG: a real photo upscaled to 4240x5664, with fine deterministic grain standing in for
/// the texture and sensor noise a real 24 MP capture has (an upscaled 60x80 image alone would be unrealistically
/// smooth and make the DCT-scale comparison too easy), encoded in memory.
fn big_jpeg() -> &'static [u8] {
    static BIG: OnceLock<Vec<u8>> = OnceLock::new();
    BIG.get_or_init(|| {
        let small = image::DynamicImage::ImageRgb8(png_rgb("photo.png"));
        // DynamicImage's non-generic resize runs at the dependencies' opt-level; imageops::resize would not.
        let mut big = small.resize_exact(4240, 5664, image::imageops::FilterType::Triangle).into_rgb8();
        let mut state = 0x2545_f491_4f6c_dd1d_u64; // xorshift64
        for v in big.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *v = v.saturating_add_signed((state >> 60) as i8 - 8);
        }
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&big).unwrap();
        out
    })
}

/// The full-resolution decode, straight from jpeg-decoder.
fn big_jpeg_full() -> &'static RgbImage {
    static FULL: OnceLock<RgbImage> = OnceLock::new();
    FULL.get_or_init(|| {
        let mut d = jpeg_decoder::Decoder::new(big_jpeg());
        let pixels = d.decode().unwrap();
        let info = d.info().unwrap();
        assert_eq!(info.pixel_format, jpeg_decoder::PixelFormat::RGB24);
        RgbImage::from_raw(u32::from(info.width), u32::from(info.height), pixels).unwrap()
    })
}

#[test]
fn large_jpeg_is_decoded_at_reduced_dct_scale_without_losing_quality() {
    // (spec, expected DCT reduction). 1/8 suffices for the 224 targets; jpeg-decoder stops at 1/4, see
    // `jpeg_decoder_one_eighth_scale_is_biased`.
    let cases = [
        (InputSpec::imagenet(224, 224), MAX_DCT),
        (letterbox_spec(224, 224), MAX_DCT),
        (InputSpec { resize: ResizeMode::Stretch, ..letterbox_spec(224, 224) }, MAX_DCT),
        // 5664 / 1024 = 5.5: a 1/4 decode (1416 px high) still downsamples, 1/8 (708) would not.
        (letterbox_spec(1024, 1024), 4),
        // 5664 / 2048 = 2.8: 1/2 still downsamples, 1/4 (1416) would not.
        (letterbox_spec(2048, 2048), 2),
        (letterbox_spec(4000, 4000), 1),
    ];
    for (spec, want_scale) in cases {
        let pp = Preprocessor::new(spec.clone(), Limits::default()).unwrap();
        let d = pp.decode(big_jpeg()).unwrap();
        assert_eq!(d.dct_scale, want_scale, "{spec:?}");
        assert_eq!((d.original_width, d.original_height), (4240, 5664));
        let s = u32::from(want_scale);
        assert_eq!(d.image.dimensions(), (4240_u32.div_ceil(s), 5664_u32.div_ceil(s)));
        if spec.width > 224 {
            continue; // large tensors are slow to compare in a debug build and add nothing
        }

        let fast = pp.prepare(big_jpeg()).unwrap();
        let full = pp.to_tensor(big_jpeg_full());
        // Compare in 8-bit levels.
        let plane = (spec.width * spec.height) as usize;
        let level = |i: usize| 255.0 * spec.std[i / plane];
        let mean: f32 = fast.iter().zip(&full).enumerate().map(|(i, (a, b))| (a - b).abs() * level(i)).sum::<f32>()
            / fast.len() as f32;
        eprintln!("{:?} {}x{} at 1/{want_scale}: mean diff {mean:.3} levels", spec.resize, spec.width, spec.height);
        assert!(mean < 0.5, "{:?} at 1/{want_scale}: mean diff {mean:.3} levels vs full decode", spec.resize);
    }
}

/// `jpeg` with an EXIF APP1 segment carrying `orientation` inserted after SOI.
fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    // Big-endian TIFF: header, IFD0 with one entry (0x0112 Orientation, SHORT, count 1), no next IFD.
    let mut app1 = b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
    app1.extend_from_slice(&orientation.to_be_bytes());
    app1.extend_from_slice(&[0; 6]);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xff, 0xe1]);
    out.extend_from_slice(&(app1.len() as u16 + 2).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn dct_scaling_and_exif_rotation_combine_correctly() {
    // A 1920x2560 portrait photo stored sideways (2560x1920) with orientation 6, as phones write them.
    let upright = image::DynamicImage::ImageRgb8(png_rgb("photo.png")).resize_exact(
        1920,
        2560,
        image::imageops::FilterType::Triangle,
    );
    let stored = upright.rotate270().into_rgb8();
    let mut plain = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut plain, 90).encode_image(&stored).unwrap();
    let jpeg = with_exif_orientation(&plain, 6);

    // (spec, DCT reduction): the center crop needs 256 px on the short side (224 / 0.875), more than 1920 / 8;
    // the 160x224 letterbox is content with 1/8.
    let cases = [
        (InputSpec::imagenet(224, 224), 4),
        (InputSpec { width: 160, height: 224, ..letterbox_spec(160, 224) }, MAX_DCT),
    ];
    for (spec, scale) in cases {
        let pp = Preprocessor::new(spec.clone(), Limits::default()).unwrap();
        let d = pp.decode(&jpeg).unwrap();
        assert_eq!((d.orientation, d.dct_scale), (6, scale), "{spec:?}");
        assert_eq!((d.original_width, d.original_height), (1920, 2560));
        assert_eq!(d.image.dimensions(), (1920 / u32::from(scale), 2560 / u32::from(scale)));

        // Reference: full-size decode, rotated upright by hand.
        let full = image::DynamicImage::ImageRgb8(
            image::load_from_memory_with_format(&plain, image::ImageFormat::Jpeg).unwrap().into_rgb8(),
        )
        .rotate90()
        .into_rgb8();
        let want = pp.to_tensor(&full);
        let got = pp.prepare(&jpeg).unwrap();
        let plane = (spec.width * spec.height) as usize;
        let mean: f32 = got
            .iter()
            .zip(&want)
            .enumerate()
            .map(|(i, (a, b))| (a - b).abs() * 255.0 * spec.std[i / plane])
            .sum::<f32>()
            / got.len() as f32;
        eprintln!("{:?} {}x{}: mean diff {mean:.3} levels", spec.resize, spec.width, spec.height);
        assert!(mean < 0.6, "{:?}: mean diff {mean:.3} levels vs full decode + manual rotation", spec.resize);
    }
}

/// Per-channel mean of (`reduced` - the `factor`x`factor` block means of `full`), in 8-bit levels.
fn dct_bias(reduced: &RgbImage, full: &RgbImage, factor: u32) -> [f64; 3] {
    assert_eq!(reduced.dimensions(), (full.width() / factor, full.height() / factor));
    let mut sums = [0.0f64; 3];
    let row_len = full.width() as usize * 3;
    let raw = full.as_raw();
    for (bx, by, px) in reduced.enumerate_pixels() {
        for c in 0..3 {
            let mut block = 0u32;
            for y in by * factor..(by + 1) * factor {
                let row = &raw[y as usize * row_len..];
                for x in bx * factor..(bx + 1) * factor {
                    block += u32::from(row[x as usize * 3 + c]);
                }
            }
            sums[c] += f64::from(px[c]) - f64::from(block) / f64::from(factor * factor);
        }
    }
    sums.map(|s| s / f64::from(reduced.width() * reduced.height()))
}

/// Why DCT reduction stops at 1/4: jpeg-decoder's 1/8 path truncates instead of rounding, shifting colours by
/// about a level. If this test fails because the bias is gone, jpeg-decoder was fixed: raise
/// `MAX_DCT_REDUCTION` in src/preprocess/resize.rs to 8 and update the expectations above.
#[test]
fn jpeg_decoder_one_eighth_scale_is_biased() {
    let full = big_jpeg_full();
    let scaled = |w, h| {
        let mut d = jpeg_decoder::Decoder::new(big_jpeg());
        assert_eq!(d.scale(w, h).unwrap(), (w, h));
        let pixels = d.decode().unwrap();
        RgbImage::from_raw(u32::from(w), u32::from(h), pixels).unwrap()
    };
    let quarter = dct_bias(&scaled(1060, 1416), full, 4);
    let eighth = dct_bias(&scaled(530, 708), full, 8);
    eprintln!("bias vs full-decode block means, levels: 1/4 {quarter:.3?}, 1/8 {eighth:.3?}");
    assert!(quarter.iter().all(|b| b.abs() < 0.3), "1/4 decode is biased: {quarter:?}");
    assert!(
        eighth[0] < -0.6 && eighth[2] < -0.6,
        "jpeg-decoder's 1/8 scale is no longer biased ({eighth:?}): raise MAX_DCT_REDUCTION to 8"
    );
}

/// Why libjpeg-turbo may go to 1/8: its scaled IDCT rounds, so the 1/8 decode matches the full decode's block
/// means (the full decode is jpeg-decoder's, an independent implementation).
#[cfg(feature = "turbojpeg")]
#[test]
fn libjpeg_turbo_one_eighth_scale_is_unbiased() {
    let d = pp().decode(big_jpeg()).unwrap();
    // attrd's own 1/8 decoder, which gives libjpeg-turbo's pixels (`one_eighth_decoder_matches_libjpeg_turbo…`).
    assert_eq!((d.codec, d.dct_scale), (Codec::OneEighth, 8));
    let bias = dct_bias(&d.image, big_jpeg_full(), 8);
    eprintln!("libjpeg-turbo 1/8 bias vs full-decode block means, levels: {bias:.3?}");
    assert!(bias.iter().all(|b| b.abs() < 0.3), "libjpeg-turbo's 1/8 decode is biased: {bias:?}");
}

/// The segment boundaries of a JPEG's header: `(offset of the 0xFF, marker)` up to and including SOS.
fn markers(jpeg: &[u8]) -> Vec<(usize, u8)> {
    let (mut i, mut out) = (2, Vec::new());
    loop {
        assert_eq!(jpeg[i], 0xff, "segment at {i}");
        out.push((i, jpeg[i + 1]));
        if jpeg[i + 1] == 0xda {
            return out;
        }
        i += 2 + usize::from(u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]));
    }
}

/// A file libjpeg-turbo decodes with a warning is not taken from it half-trusted: jpeg-decoder decodes it (or
/// refuses it) exactly as it would without the fast path.
#[test]
fn jpegs_libjpeg_turbo_warns_about_are_decoded_by_jpeg_decoder() {
    let clean = fixture("photo.jpg");
    let reference = decode("photo.jpg");
    // Three stray bytes before the frame header: libjpeg's "Corrupt JPEG data: 3 extraneous bytes before marker
    // 0xc0", a warning after which it still decodes the whole image.
    let sof = markers(&clean).iter().find(|&&(_, m)| m == 0xc0).unwrap().0;
    let mut stray = clean[..sof].to_vec();
    stray.extend_from_slice(b"\x12\x34\x56");
    stray.extend_from_slice(&clean[sof..]);
    let d = pp().decode(&stray).unwrap();
    assert_eq!(d.codec, Codec::JpegDecoder);
    let (mean, _) = diff(&d.image, &reference.image);
    assert!(mean < 1.0, "mean diff {mean} levels from the clean file");
}

/// EXIF orientation is read wherever the APP1 segment sits before the scan, also after the frame header, where a
/// header-only parse (which stops at the frame header) would miss it.
#[test]
fn exif_after_the_frame_header_still_rotates() {
    let plain = fixture("photo.jpg");
    let with_exif = with_exif_orientation(&plain, 6);
    let app1_len = with_exif.len() - plain.len();
    let sos = markers(&plain).last().unwrap().0;
    let mut late = plain[..sos].to_vec();
    late.extend_from_slice(&with_exif[2..2 + app1_len]);
    late.extend_from_slice(&plain[sos..]);
    let sof = markers(&late).iter().position(|&(_, m)| m == 0xc0).unwrap();
    let app1 = markers(&late).iter().position(|&(_, m)| m == 0xe1).unwrap();
    assert!(app1 > sof, "the fixture must put APP1 after SOF0");

    let early = pp().decode(&with_exif).unwrap();
    let d = pp().decode(&late).unwrap();
    assert_eq!((d.orientation, d.image.dimensions()), (6, (80, 60)));
    assert_eq!(d.image, early.image);
    assert_eq!(d.codec, if TURBO { Codec::LibjpegTurbo } else { Codec::JpegDecoder });
}

#[test]
fn pixel_limit_applies_to_the_jpeg_header_not_the_reduced_decode() {
    // 24 MP is over a 20 MP limit even though a 224 target would decode only 0.4 MP of it.
    let limits = Limits { max_pixels: 20_000_000, ..Limits::default() };
    let pp = Preprocessor::new(InputSpec::imagenet(224, 224), limits).unwrap();
    let e = pp.decode(big_jpeg()).unwrap_err();
    assert!(matches!(e, PreprocessError::TooManyPixels { width: 4240, height: 5664, limit: 20_000_000 }), "{e:?}");
    assert_eq!(e.to_string(), "image is 4240x5664 = 24.0 MP, over the 20 MP limit");

    // A header claiming 65535x65535 (12.9 GB as RGB) over a few KB of data: refused from the header alone. Had
    // anything been decoded first, this would be a truncation error (or an allocation failure), not TooManyPixels.
    let mut bomb = fixture("photo.jpg");
    let sof = bomb.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
    bomb[sof + 5..sof + 9].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    let started = std::time::Instant::now();
    let e = Preprocessor::new(InputSpec::imagenet(224, 224), Limits::default()).unwrap().decode(&bomb).unwrap_err();
    assert!(matches!(e, PreprocessError::TooManyPixels { width: 65535, height: 65535, .. }), "{e:?}");
    assert!(started.elapsed().as_secs_f64() < 1.0, "header check took {:?}", started.elapsed());
}

// ------------------------------------------------------------------------------------------------------------------
// Limits, spec, API behaviour

#[test]
fn file_size_limit_is_checked_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("photo.png");
    let bytes = fixture("photo.png");
    std::fs::write(&path, &bytes).unwrap();
    let len = bytes.len() as u64;

    let tight = |max_file_bytes| {
        Preprocessor::new(letterbox_spec(32, 32), Limits { max_file_bytes, ..Limits::default() }).unwrap()
    };
    match tight(len - 1).prepare_path(&path) {
        Err(PreprocessError::FileTooLarge { bytes, limit }) => assert_eq!((bytes, limit), (len, len - 1)),
        other => panic!("{other:?}"),
    }
    // The same limit applies to in-memory data.
    assert!(matches!(tight(len - 1).decode(&bytes), Err(PreprocessError::FileTooLarge { .. })));
    // Exactly at the limit is fine, and gives the same tensor as prepare().
    let pp = tight(len);
    assert_eq!(pp.prepare_path(&path).unwrap(), pp.prepare(&bytes).unwrap());

    let missing = dir.path().join("nope.jpg");
    match pp.prepare_path(&missing) {
        Err(e @ PreprocessError::Io { .. }) => {
            assert!(e.to_string().contains("nope.jpg"), "{e}");
            assert!(std::error::Error::source(&e).is_some());
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(pp.prepare_path(dir.path()), Err(PreprocessError::Io { .. })), "a directory is not an image");
}

#[test]
fn pixel_limit_on_png_and_webp() {
    let limits = Limits { max_pixels: 60 * 80 - 1, ..Limits::default() };
    let pp = Preprocessor::new(letterbox_spec(32, 32), limits).unwrap();
    for name in ["photo.png", "photo.webp", "photo.jpg"] {
        match pp.decode(&fixture(name)) {
            Err(PreprocessError::TooManyPixels { width: 60, height: 80, limit: 4799 }) => {}
            other => panic!("{name}: {other:?}"),
        }
    }
    let limits = Limits { max_pixels: 60 * 80, ..Limits::default() };
    let pp = Preprocessor::new(letterbox_spec(32, 32), limits).unwrap();
    for name in ["photo.png", "photo.webp", "photo.jpg"] {
        pp.decode(&fixture(name)).unwrap();
    }
}

const SPEC_JSON: &str = r#"{
  "width": 224,
  "height": 192,
  "resize": "center_crop",
  "crop_fraction": 0.875,
  "interpolation": "lanczos3",
  "fill": [255, 255, 255],
  "mean": [0.485, 0.456, 0.406],
  "std": [0.229, 0.224, 0.225],
  "channel_order": "bgr",
  "layout": "nhwc"
}"#;

#[test]
fn spec_serde_round_trip_and_strictness() {
    let spec: InputSpec = serde_json::from_str(SPEC_JSON).unwrap();
    assert_eq!(spec.resize, ResizeMode::CenterCrop);
    assert_eq!(spec.interpolation, Interpolation::Lanczos3);
    assert_eq!((spec.channel_order, spec.layout), (ChannelOrder::Bgr, Layout::Nhwc));
    spec.validate().unwrap();
    // Through text, as the manifest is written: f32 fields keep their short decimal form (0.485, not
    // 0.48500001430511475), so the round trip is exact.
    let text = serde_json::to_string_pretty(&spec).unwrap();
    assert!(text.contains("0.485") && !text.contains("0.4850000"), "{text}");
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value, serde_json::from_str::<serde_json::Value>(SPEC_JSON).unwrap());
    assert_eq!(serde_json::from_str::<InputSpec>(&text).unwrap(), spec);
    for mode in ["center_crop", "letterbox", "stretch"] {
        let s = SPEC_JSON.replace("\"center_crop\"", &format!("\"{mode}\""));
        serde_json::from_str::<InputSpec>(&s).unwrap();
    }

    let unknown = SPEC_JSON.replace("\"width\"", "\"antialias\": true,\n  \"width\"");
    let e = serde_json::from_str::<InputSpec>(&unknown).unwrap_err().to_string();
    assert!(e.contains("unknown field `antialias`"), "{e}");
    let missing = SPEC_JSON.replace("\"fill\": [255, 255, 255],", "");
    let e = serde_json::from_str::<InputSpec>(&missing).unwrap_err().to_string();
    assert!(e.contains("missing field `fill`"), "{e}");
    for bad in ["\"CenterCrop\"", "\"center-crop\"", "\"crop\""] {
        assert!(serde_json::from_str::<InputSpec>(&SPEC_JSON.replace("\"center_crop\"", bad)).is_err(), "{bad}");
    }
    assert!(serde_json::from_str::<InputSpec>(&SPEC_JSON.replace("[255, 255, 255]", "[256, 0, 0]")).is_err());

    // Valid JSON, invalid values: caught by validate() / Preprocessor::new.
    let zero_std: InputSpec = serde_json::from_str(&SPEC_JSON.replace("0.229", "0.0")).unwrap();
    let e = Preprocessor::new(zero_std, Limits::default()).unwrap_err();
    assert_eq!(e.to_string(), "invalid input spec: std[0] (red) is 0, must be finite and > 0");
}

#[test]
fn limits_serde() {
    let limits: Limits = serde_json::from_str(r#"{"max_file_bytes": 1048576, "max_pixels": 50000000}"#).unwrap();
    assert_eq!(limits, Limits { max_file_bytes: 1 << 20, max_pixels: 50_000_000 });
    assert_eq!(serde_json::from_value::<Limits>(serde_json::to_value(limits).unwrap()).unwrap(), limits);
    assert!(serde_json::from_str::<Limits>(r#"{"max_file_bytes": 1, "max_pixels": 1, "max_width": 5}"#).is_err());
    assert_eq!(Limits::default(), Limits { max_file_bytes: 64 << 20, max_pixels: 100_000_000 });
}

#[test]
fn prepare_is_deterministic_across_threads() {
    let pp = Preprocessor::new(InputSpec::imagenet(64, 64), Limits::default()).unwrap();
    let names = ["photo.jpg", "cmyk.jpg", "rgba.png", "exif-6.jpg", "lossy.webp", "palette.png"];
    let expected: Vec<Vec<f32>> = names.iter().map(|n| pp.prepare(&fixture(n)).unwrap()).collect();
    std::thread::scope(|s| {
        for _ in 0..4 {
            let pp = pp.clone();
            let expected = &expected;
            s.spawn(move || {
                for _ in 0..3 {
                    for (name, want) in names.iter().zip(expected) {
                        assert_eq!(&pp.prepare(&fixture(name)).unwrap(), want, "{name}");
                    }
                }
            });
        }
    });
    let batch = pp.batch(&expected);
    assert_eq!(batch.shape(), &[names.len(), 3, 64, 64]);
    assert_eq!(batch.index_axis(ndarray::Axis(0), 2).iter().copied().collect::<Vec<_>>(), expected[2]);
}

/// A sample of the real catalogue, if this machine has it: every photo must go through the whole pipeline.
#[test]
fn real_dataset_sample_preprocesses() {
    let dir = Path::new("/work/shared/data/fashion/images");
    let Ok(entries) = std::fs::read_dir(dir) else {
        eprintln!("skipping: {} not available", dir.display());
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let pp = Preprocessor::new(InputSpec::imagenet(224, 224), Limits::default()).unwrap();
    for path in paths.iter().step_by((paths.len() / 150).max(1)) {
        let t = pp.prepare_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(t.iter().all(|v| v.is_finite() && v.abs() < 3.0), "{}", path.display());
    }
}

// ------------------------------------------------------------------------------------------------------------------
// attrd's 1/8-scale JPEG decoder (`Codec::OneEighth`), held to libjpeg-turbo's own 1/8-scale decode

/// libjpeg-turbo's 1/8-scale decode through its TurboJPEG API (an `Err` for any warning, as in the fast path).
#[cfg(feature = "turbojpeg")]
fn libjpeg_one_eighth(jpeg: &[u8]) -> Result<RgbImage, String> {
    attrd::preprocess::libjpeg_turbo_one_eighth(jpeg, u64::MAX)
}

#[cfg(feature = "turbojpeg")]
fn encode_with_libjpeg(img: &RgbImage, subsamp: turbojpeg::Subsamp, quality: i32, progressive: bool) -> Vec<u8> {
    let mut c = turbojpeg::Compressor::new().unwrap();
    c.set_quality(quality).unwrap();
    c.set_subsamp(subsamp).unwrap();
    c.set_progressive(progressive).unwrap();
    let (width, height) = (img.width() as usize, img.height() as usize);
    let image = turbojpeg::Image {
        pixels: img.as_raw().as_slice(),
        width,
        pitch: 3 * width,
        height,
        format: turbojpeg::PixelFormat::RGB,
    };
    c.compress_to_vec(image).unwrap()
}

/// What the 1/8 tests decoded, left where `scripts/check-jpeg-arm` asks (`ATTRD_DUMP_ONE_EIGHTH=DIR`), so that
/// libjpeg-turbo's aarch64 build (NEON, where x86 runs SSE2/AVX2) can be held to the same pixels on emulated ARM.
#[cfg(feature = "turbojpeg")]
struct Dump {
    dir: PathBuf,
    index: std::fs::File,
    n: usize,
}

#[cfg(feature = "turbojpeg")]
impl Dump {
    /// `None` unless asked for; `set` names this test's subdirectory (tests run in parallel).
    fn from_env(set: &str) -> Option<Self> {
        let dir = PathBuf::from(std::env::var_os("ATTRD_DUMP_ONE_EIGHTH")?).join(set);
        std::fs::create_dir_all(&dir).unwrap();
        let index = std::fs::File::create(dir.join("index.tsv")).unwrap();
        Some(Dump { dir, index, n: 0 })
    }

    fn add(&mut self, name: &str, jpeg: &[u8], ours: &RgbImage) {
        use std::io::Write;
        self.n += 1;
        let n = self.n;
        std::fs::write(self.dir.join(format!("{n:04}.jpg")), jpeg).unwrap();
        std::fs::write(self.dir.join(format!("{n:04}.rgb")), ours.as_raw()).unwrap();
        writeln!(self.index, "{n:04}\t{}\t{}\t{name}", ours.width(), ours.height()).unwrap();
    }
}

/// Every 1/8 decode attrd accepts is libjpeg-turbo's, byte for byte: real catalogue photos as the studio exported
/// them, the same photos re-encoded in every chroma layout libjpeg writes (4:4:4, 4:2:2, 4:2:0, grey, 4:4:0, 4:1:1,
/// 4:4:1) at qualities from 5 to 100 (long codes and large coefficients), restart markers, odd sizes, and a 24 MP
/// photo with sensor noise.
#[cfg(feature = "turbojpeg")]
#[test]
fn one_eighth_decoder_matches_libjpeg_turbo_to_the_bit() {
    use turbojpeg::Subsamp::*;
    let mut cases: Vec<(String, Vec<u8>, bool)> = Vec::new(); // (name, file, must be accepted)
    for name in
        ["photo.jpg", "gray.jpg", "shoe.jpg", "exif-3.jpg", "exif-6.jpg", "restart-mcu.jpg", "restart-rows-444.jpg"]
    {
        cases.push((name.into(), fixture(name), true));
    }
    cases.push(("24 MP".into(), big_jpeg().to_vec(), true));
    let layouts = [None, Sub2x1, Sub2x2, Gray, Sub1x2, Sub4x1, Sub1x4];
    let qualities = [5, 50, 75, 90, 95, 100];
    let photos = crate::common::fashion().join("images");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&photos)
        .unwrap_or_else(|e| panic!("{}: {e}", photos.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    for (i, path) in paths.iter().step_by(paths.len() / 84).enumerate() {
        let bytes = std::fs::read(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let rgb = image::load_from_memory(&bytes).unwrap().into_rgb8();
        // The dataset's own files may be progressive (declined); everything libjpeg-turbo writes here is baseline.
        cases.push((name.clone(), bytes, false));
        let (layout, quality) = (layouts[i % layouts.len()], qualities[i % qualities.len()]);
        cases.push((format!("{name} {layout:?} q{quality}"), encode_with_libjpeg(&rgb, layout, quality, false), true));
    }
    // Files libjpeg-turbo takes without a warning although they are not textbook: a restart marker right before
    // EOI (some phones write one), with and without a restart interval; and no Huffman tables at all (Motion-JPEG
    // camera frames), which means the standard ones.
    let before_eoi = |jpeg: &[u8], extra: &[u8]| {
        let eoi = jpeg.len() - 2;
        [&jpeg[..eoi], extra, &jpeg[eoi..]].concat()
    };
    cases.push(("trailing RST, DRI".into(), before_eoi(&fixture("restart-mcu.jpg"), b"\xff\xd3"), true));
    cases.push(("trailing RST, no DRI".into(), before_eoi(&fixture("photo.jpg"), b"\xff\xd0"), true));
    let standard = encode_with_libjpeg(&png_rgb("photo.png"), Sub2x1, 85, false);
    let mut no_dht = standard[..2].to_vec();
    let segments = markers(&standard);
    for (i, &(at, marker)) in segments.iter().enumerate() {
        let end = segments.get(i + 1).map_or(standard.len(), |&(next, _)| next);
        if marker != 0xc4 {
            no_dht.extend_from_slice(&standard[at..end]);
        }
    }
    assert!(no_dht.len() < standard.len(), "the encoder wrote its tables");
    cases.push(("no DHT".into(), no_dht, true));
    let mut dump = Dump::from_env("clean");
    let mut accepted = 0;
    for (name, jpeg, must) in &cases {
        let reference = libjpeg_one_eighth(jpeg).unwrap_or_else(|e| panic!("{name}: libjpeg-turbo: {e}"));
        match attrd::preprocess::decode_one_eighth(jpeg, u64::MAX) {
            Ok(ours) => {
                accepted += 1;
                assert_eq!(ours.dimensions(), reference.dimensions(), "{name}");
                if ours != reference {
                    let (mean, max) = diff(&ours, &reference);
                    panic!("{name}: differs from libjpeg-turbo's 1/8 decode (mean {mean:.4}, max {max} levels)");
                }
                if let Some(d) = &mut dump {
                    d.add(name, jpeg, &ours);
                }
            }
            Err(reason) => assert!(!must, "{name}: declined ({reason})"),
        }
    }
    eprintln!("{accepted} of {} files decoded, all identical to libjpeg-turbo", cases.len());
    assert!(accepted * 10 >= cases.len() * 9, "only {accepted} of {} accepted", cases.len());
}

/// The decoder only ever accepts: what it is not sure of goes to libjpeg-turbo. Damaged data (every single-byte
/// change across a file's entropy-coded data and headers, and cuts) is either declined, or decoded to exactly what
/// libjpeg-turbo decodes without a warning; never accepted where libjpeg-turbo warns.
#[cfg(feature = "turbojpeg")]
#[test]
fn one_eighth_decoder_declines_what_libjpeg_turbo_would_warn_about() {
    let ours = |jpeg: &[u8]| attrd::preprocess::decode_one_eighth(jpeg, u64::MAX);
    // Known declines, each with its reason.
    let progressive = fixture("progressive.jpg");
    assert!(ours(&progressive).unwrap_err().contains("progressive"));
    let restart = fixture("restart-mcu.jpg");
    let rst: Vec<usize> =
        (0..restart.len() - 1).filter(|&i| restart[i] == 0xff && (0xd0..=0xd7).contains(&restart[i + 1])).collect();
    assert!(rst.len() > 8, "the fixture's restart markers wrap past RST7");
    let mut swapped = restart.clone();
    swapped[rst[3] + 1] = 0xd5;
    assert!(ours(&swapped).unwrap_err().contains("restart marker"), "{:?}", ours(&swapped));
    assert!(libjpeg_one_eighth(&swapped).is_err(), "libjpeg-turbo warns too");
    let clean = fixture("photo.jpg");
    let mut extra = clean[..clean.len() - 2].to_vec();
    extra.extend_from_slice(b"\x12\x34\xff\xd9");
    // Stricter than libjpeg-turbo, which drops bytes its bit buffer had read ahead at the end of a scan unseen.
    assert!(ours(&extra).unwrap_err().contains("extraneous bytes"), "{:?}", ours(&extra));
    // An over-subscribed Huffman table (three 1-bit codes), same segment length: declined, not a panic.
    let dht = markers(&clean).iter().find(|&&(_, m)| m == 0xc4).unwrap().0;
    let mut oversubscribed = clean.clone();
    let counts = dht + 5..dht + 21;
    let donor = counts.clone().find(|&i| clean[i] >= 3).unwrap();
    oversubscribed[donor] -= 3;
    oversubscribed[counts.start] += 3;
    assert!(ours(&oversubscribed).unwrap_err().contains("bad Huffman table"), "{:?}", ours(&oversubscribed));
    // Chroma terms so large that libjpeg-turbo's C 2×2 IDCT (64-bit, wrapping range limit) and its SIMD one
    // (16-bit, saturating) disagree: a fuzzer find, here made with legal but absurd chroma quantisers of 255.
    // Declined, so the decode is libjpeg-turbo's own.
    let dqt = markers(&clean).iter().filter(|&&(_, m)| m == 0xdb).nth(1).unwrap().0;
    let mut absurd = clean.clone();
    assert_eq!(absurd[dqt + 4] >> 4, 0, "8-bit quantisers");
    absurd[dqt + 5..dqt + 69].fill(255);
    assert!(ours(&absurd).unwrap_err().contains("chroma terms"), "{:?}", ours(&absurd));
    assert!(libjpeg_one_eighth(&absurd).is_ok());
    // 12 blocks per MCU (4:4:4 with every component 2×2): libjpeg refuses it when decoding, not in the header.
    let sof = markers(&clean).iter().find(|&&(_, m)| m == 0xc0).unwrap().0;
    let mut big_mcu = clean.clone();
    assert_eq!((big_mcu[sof + 9], big_mcu[sof + 11], big_mcu[sof + 14], big_mcu[sof + 17]), (3, 0x22, 0x11, 0x11));
    big_mcu[sof + 14] = 0x22;
    big_mcu[sof + 17] = 0x22;
    assert!(ours(&big_mcu).unwrap_err().contains("more than 10 blocks"), "{:?}", ours(&big_mcu));
    assert!(libjpeg_one_eighth(&big_mcu).is_err());
    // A flood of restart markers is refused at the first one too many, before it costs memory.
    let eoi = restart.len() - 2;
    let flood: Vec<u8> = (0..4000u32).flat_map(|i| [0xff, 0xd0 + (i % 8) as u8]).collect();
    let flooded = [&restart[..eoi], &flood, &restart[eoi..]].concat();
    assert!(ours(&flooded).unwrap_err().contains("more restart markers"), "{:?}", ours(&flooded));
    for cut in [clean.len() - 2, clean.len() / 2, 700] {
        assert!(ours(&clean[..cut]).is_err(), "cut at {cut}");
    }
    // Differential: every single-byte change, and a bit flip, at a spread of offsets.
    let mut dump = Dump::from_env("damaged");
    let (mut declined, mut same) = (0, 0);
    for jpeg in [&clean, &restart, &fixture("gray.jpg")] {
        for at in (2..jpeg.len() - 2).step_by(7) {
            for value in [jpeg[at] ^ 0x10, 0x00, 0xff] {
                let mut bad = jpeg.to_vec();
                bad[at] = value;
                match ours(&bad) {
                    Err(_) => declined += 1,
                    Ok(img) => {
                        let reference = libjpeg_one_eighth(&bad).unwrap_or_else(|e| {
                            panic!("accepted a file libjpeg-turbo refuses ({e}): byte {at} = {value:#04x}")
                        });
                        assert!(img == reference, "byte {at} = {value:#04x}: differs from libjpeg-turbo");
                        same += 1;
                        if let Some(d) = &mut dump {
                            d.add(&format!("byte {at} = {value:#04x}"), &bad, &img);
                        }
                    }
                }
            }
        }
    }
    eprintln!("damaged files: {declined} declined, {same} accepted and identical to libjpeg-turbo");
    assert!(declined > 0 && same > 0);
    // The fuzzer's finds are odder still (`tests/it/fuzz_corpus.rs` holds them to libjpeg-turbo on this machine).
    if let Some(d) = &mut dump {
        for entry in std::fs::read_dir(crate::common::repo().join("fuzz/corpus/one_eighth")).unwrap() {
            let path = entry.unwrap().path();
            let jpeg = std::fs::read(&path).unwrap();
            if let Ok(img) = ours(&jpeg) {
                d.add(&path.file_name().unwrap().to_string_lossy(), &jpeg, &img);
            }
        }
    }
}

/// Through the public API a large photo takes the 1/8 decoder, and gets libjpeg-turbo's pixels.
#[cfg(feature = "turbojpeg")]
#[test]
fn large_photos_take_the_one_eighth_decoder() {
    let d = pp().decode(big_jpeg()).unwrap();
    assert_eq!((d.codec, d.dct_scale, d.image.dimensions()), (Codec::OneEighth, 8, (530, 708)));
    assert!(d.image == libjpeg_one_eighth(big_jpeg()).unwrap());
    // A progressive one is declined and goes to libjpeg-turbo at the same scale.
    let rgb = image::load_from_memory(big_jpeg()).unwrap().into_rgb8();
    let progressive = encode_with_libjpeg(&rgb, turbojpeg::Subsamp::Sub2x2, 80, true);
    let d = pp().decode(&progressive).unwrap();
    assert_eq!((d.codec, d.dct_scale), (Codec::LibjpegTurbo, 8));
}
