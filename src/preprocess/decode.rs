//! Bytes → upright RGB8: format sniffing, limits, JPEG (with DCT-domain downscaling), PNG/WebP, alpha, EXIF.

use super::error::{DecoderPanic, ImageKind, PreprocessError};
use super::resize;
use super::spec::{InputSpec, Limits};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, RgbImage};
use jpeg_decoder::PixelFormat;
use std::io::Cursor;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// An image decoded for a particular [`InputSpec`](super::InputSpec): upright (EXIF orientation applied), RGB8,
/// transparency composited over the spec's `fill`.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The pixels. For a large JPEG this is the reduced-resolution DCT decode (see `dct_scale`): still at least as
    /// large as the resize step needs for the spec it was decoded for, but not the full-resolution image.
    pub image: RgbImage,
    /// Container format, detected from the data.
    pub format: ImageKind,
    /// Full-resolution width as displayed (after EXIF orientation), from the header.
    pub original_width: u32,
    /// Full-resolution height as displayed (after EXIF orientation), from the header.
    pub original_height: u32,
    /// 1, 2, 4 or 8: a JPEG decoded at 1/`dct_scale` resolution in the DCT domain (at most 4 when jpeg-decoder
    /// decoded it, see `resize::MAX_DCT_REDUCTION`); always 1 for PNG and WebP.
    pub dct_scale: u8,
    /// EXIF orientation that was applied, 1..=8 (1 = none or no EXIF).
    pub orientation: u8,
    /// The library that produced the pixels.
    pub codec: Codec,
}

impl Decoded {
    /// A decoded JPEG: `rgb` as stored, of a `stored` (header) size image, turned upright here.
    pub(super) fn jpeg(rgb: RgbImage, stored: (u32, u32), dct_scale: u8, orientation: u8, codec: Codec) -> Self {
        let (original_width, original_height) = oriented(stored.0, stored.1, orientation);
        Decoded {
            image: apply_orientation(rgb, orientation),
            format: ImageKind::Jpeg,
            original_width,
            original_height,
            dct_scale,
            orientation,
            codec,
        }
    }
}

/// The decoder behind a [`Decoded`] image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// libjpeg-turbo: ordinary JPEGs (8-bit YCbCr, grey or RGB) it decodes without a warning.
    LibjpegTurbo,
    /// attrd's own decoder of clean baseline JPEGs at 1/8 scale (`eighth.rs`), used for large photos. It gives
    /// libjpeg-turbo's 1/8-scale pixels to the bit, faster, by skipping AC terms it does not need.
    OneEighth,
    /// jpeg-decoder (pure Rust): every other JPEG (CMYK, lossless, 12-bit, damaged), or all of them when built
    /// without the `turbojpeg` feature.
    JpegDecoder,
    /// The `image` crate: PNG and WebP.
    Image,
}

/// The whole decode step, with the limits enforced. Never panics: a panic inside a third-party decoder on hostile
/// input is turned into [`PreprocessError::Decode`].
pub(crate) fn decode(bytes: &[u8], spec: &InputSpec, limits: &Limits) -> Result<Decoded, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let len = bytes.len() as u64;
    if len > limits.max_file_bytes {
        return Err(PreprocessError::FileTooLarge { bytes: len, limit: limits.max_file_bytes });
    }
    let format = sniff(bytes)?;
    let result = catch_unwind(AssertUnwindSafe(|| match format {
        ImageKind::Jpeg => decode_jpeg(bytes, spec, limits),
        ImageKind::Png | ImageKind::Webp => decode_with_image(bytes, format, spec, limits),
    }));
    result.unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        Err(PreprocessError::Decode { format, source: Box::new(DecoderPanic(msg)) })
    })
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
const JPEG_SIGNATURE: &[u8] = b"\xff\xd8\xff";

/// Detects the container from its magic bytes. File names and MIME types lie; magic bytes rarely do.
pub(crate) fn sniff(bytes: &[u8]) -> Result<ImageKind, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    if bytes.starts_with(JPEG_SIGNATURE) {
        return Ok(ImageKind::Jpeg);
    }
    if bytes.starts_with(PNG_SIGNATURE) {
        return Ok(ImageKind::Png);
    }
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return Ok(ImageKind::Webp);
    }
    // A few bytes of a real image (an upload cut off almost immediately) deserve "truncated", not "unknown".
    let truncated = |format| Err(PreprocessError::Truncated { format, len: bytes.len(), source: None });
    if JPEG_SIGNATURE.starts_with(bytes) {
        return truncated(ImageKind::Jpeg);
    }
    if PNG_SIGNATURE.starts_with(bytes) {
        return truncated(ImageKind::Png);
    }
    if bytes.len() < 12 && b"RIFF".starts_with(&bytes[..bytes.len().min(4)]) {
        return truncated(ImageKind::Webp);
    }
    if let Some(format) = other_format(bytes) {
        return Err(PreprocessError::UnsupportedFormat { format });
    }
    Err(PreprocessError::UnknownFormat { magic: describe_magic(bytes) })
}

/// Formats people commonly upload by mistake, so the error can say what the file actually is.
fn other_format(b: &[u8]) -> Option<&'static str> {
    let brand = |brands: &[&[u8]]| b.len() >= 12 && &b[4..8] == b"ftyp" && brands.contains(&&b[8..12]);
    if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        Some("GIF")
    } else if b.starts_with(b"BM") && b.len() >= 14 {
        Some("BMP")
    } else if b.starts_with(b"II*\0") || b.starts_with(b"MM\0*") {
        Some("TIFF")
    } else if brand(&[b"avif", b"avis"]) {
        Some("AVIF")
    } else if brand(&[b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"]) {
        Some("HEIC/HEIF")
    } else if b.starts_with(b"\xff\x0a") || b.starts_with(b"\0\0\0\x0cJXL \r\n\x87\n") {
        Some("JPEG XL")
    } else if b.starts_with(b"\0\0\0\x0cjP  \r\n\x87\n") || b.starts_with(b"\xff\x4f\xff\x51") {
        Some("JPEG 2000")
    } else if b.starts_with(b"%PDF") {
        Some("PDF")
    } else {
        None
    }
}

/// First bytes as hex plus their printable ASCII, so "<!DOCTYPE html" from a misconfigured CDN is obvious in logs.
fn describe_magic(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(12)];
    let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
    let ascii: String = head.iter().map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' }).collect();
    format!("{} {:?}", hex.join(" "), ascii)
}

fn check_pixels(width: u32, height: u32, limits: &Limits) -> Result<(), PreprocessError> {
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(PreprocessError::TooManyPixels { width, height, limit: limits.max_pixels });
    }
    Ok(())
}

/// Width and height as displayed once `orientation` is applied (5..=8 swap the axes).
pub(super) fn oriented(width: u32, height: u32, orientation: u8) -> (u32, u32) {
    if (5..=8).contains(&orientation) { (height, width) } else { (width, height) }
}

// ---------------------------------------------------------------------------------------------------------------
// JPEG

fn decode_jpeg(bytes: &[u8], spec: &InputSpec, limits: &Limits) -> Result<Decoded, PreprocessError> {
    #[cfg(feature = "turbojpeg")]
    match super::turbo::decode(bytes, spec, limits) {
        Ok(decoded) => return Ok(decoded),
        Err(reason) => tracing::debug!(%reason, "libjpeg-turbo declined the file; decoding it with jpeg-decoder"),
    }
    let len = bytes.len();
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    // Header only (markers up to the frame header): nothing proportional to the pixel count is allocated yet.
    decoder.read_info().map_err(|e| jpeg_error(e, len))?;
    let info = decoder.info().ok_or_else(|| jpeg_invariant("no frame info after reading the header"))?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    check_pixels(width, height, limits)?;

    // APP1 normally precedes the frame header, so the orientation is known now; it matters for the scale choice
    // when the target is not square.
    let header_orientation = decoder.exif_data().and_then(exif_orientation).unwrap_or(1);
    let (ow, oh) = oriented(width, height, header_orientation);
    let mut dct_scale = resize::choose_dct_scale(spec, ow, oh, resize::MAX_DCT_REDUCTION);
    if dct_scale > 1 {
        let want = (scaled_len(info.width, dct_scale), scaled_len(info.height, dct_scale));
        let got = decoder.scale(want.0, want.1).map_err(|e| jpeg_error(e, len))?;
        if got != want {
            // jpeg-decoder picks its own factor from the requested size ("either axis" rule); only for images a few
            // pixels wide can that disagree with ours. Start over at full size rather than under-sample.
            tracing::debug!(?want, ?got, "jpeg-decoder chose another DCT scale; decoding at full size");
            decoder = jpeg_decoder::Decoder::new(bytes);
            decoder.read_info().map_err(|e| jpeg_error(e, len))?;
            dct_scale = 1;
        } else {
            tracing::debug!(
                width,
                height,
                dct_scale,
                decoded_width = got.0,
                decoded_height = got.1,
                target_width = spec.width,
                target_height = spec.height,
                resize = ?spec.resize,
                "decoding JPEG at reduced DCT scale"
            );
        }
    }
    let out_info = decoder.info().ok_or_else(|| jpeg_invariant("no frame info before decoding"))?;
    let (dw, dh) = (u32::from(out_info.width), u32::from(out_info.height));
    // Belt and braces behind the header check: jpeg-decoder refuses to allocate more than this for the output.
    let max_buf = limits.max_pixels.saturating_mul(4).min(usize::MAX as u64) as usize;
    decoder.set_max_decoding_buffer_size(max_buf);

    // jpeg-decoder only returns Ok once it has read the EOI marker (its marker loop has no other exit), and
    // running out of data anywhere is an `UnexpectedEof` I/O error, which `jpeg_error` reports as truncation;
    // so a cut-off file cannot come back as a silently half-grey image.
    let pixels = decoder.decode().map_err(|e| jpeg_error(e, len))?;
    let orientation = decoder.exif_data().and_then(exif_orientation).unwrap_or(header_orientation);
    let rgb = jpeg_to_rgb(pixels, dw, dh, out_info.pixel_format, bytes)?;
    Ok(Decoded::jpeg(rgb, (width, height), dct_scale, orientation, Codec::JpegDecoder))
}

/// Size of one axis decoded at 1/`dct_scale`, as jpeg-decoder computes it (partial blocks round up).
fn scaled_len(len: u16, dct_scale: u8) -> u16 {
    len.div_ceil(u16::from(dct_scale))
}

fn jpeg_error(e: jpeg_decoder::Error, len: usize) -> PreprocessError {
    match &e {
        jpeg_decoder::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            PreprocessError::Truncated { format: ImageKind::Jpeg, len, source: Some(Box::new(e)) }
        }
        _ => PreprocessError::Decode { format: ImageKind::Jpeg, source: Box::new(e) },
    }
}

fn jpeg_invariant(what: &str) -> PreprocessError {
    PreprocessError::Decode { format: ImageKind::Jpeg, source: format!("jpeg-decoder: {what}").into() }
}

/// Converts jpeg-decoder's output buffer to RGB8, reusing the buffer for the common RGB24 case.
fn jpeg_to_rgb(
    pixels: Vec<u8>,
    width: u32,
    height: u32,
    format: PixelFormat,
    bytes: &[u8],
) -> Result<RgbImage, PreprocessError> {
    let count = width as usize * height as usize;
    let components = match format {
        PixelFormat::L8 | PixelFormat::L16 => 1,
        PixelFormat::RGB24 => 3,
        PixelFormat::CMYK32 => 4,
    };
    // Lossless JPEGs of more than 8 bits come back as native-endian u16 samples even when `info` says RGB24.
    let sample_bytes = match pixels.len() {
        n if n == count * components => 1,
        n if n == count * components * 2 => 2,
        n => {
            return Err(jpeg_invariant(&format!("{n} bytes of pixels for a {width}x{height} {format:?} image")));
        }
    };
    // Sample precision is only needed for the rare lossless / 12-bit files; jpeg-decoder does not expose it.
    let precision = || sof_precision(bytes).unwrap_or(if sample_bytes == 2 { 16 } else { 8 });
    let mut rgb = Vec::with_capacity(count * 3);
    match (components, sample_bytes) {
        (3, 1) if precision() == 8 => rgb = pixels,
        (4, 1) => {
            // jpeg-decoder undoes Adobe's inversion (and the YCCK transform), handing out plain CMYK ink amounts;
            // convert the way Pillow (and most viewers without a colour-management pass) do.
            for p in pixels.chunks_exact(4) {
                let nk = 255 - u32::from(p[3]);
                for &c in &p[..3] {
                    rgb.push((nk - muldiv255(u32::from(c), nk)) as u8);
                }
            }
        }
        (_, 1) => {
            let lut = rescale_lut(precision());
            for p in pixels.chunks_exact(components) {
                match components {
                    1 => rgb.extend_from_slice(&[lut[usize::from(p[0])]; 3]),
                    _ => rgb.extend(p.iter().map(|&v| lut[usize::from(v)])),
                }
            }
        }
        _ => {
            let max = (1u32 << precision().clamp(1, 16)) - 1;
            let to8 = |b: &[u8]| {
                let v = u32::from(u16::from_ne_bytes([b[0], b[1]])).min(max);
                ((v * 255 + max / 2) / max) as u8
            };
            for p in pixels.chunks_exact(2 * components) {
                match components {
                    1 => rgb.extend_from_slice(&[to8(p); 3]),
                    _ => rgb.extend(p.chunks_exact(2).take(3).map(to8)),
                }
            }
        }
    }
    RgbImage::from_raw(width, height, rgb).ok_or_else(|| jpeg_invariant("RGB buffer does not match the image size"))
}

/// round(a * b / 255) for 8-bit a, b; the exact integer form Pillow uses.
fn muldiv255(a: u32, b: u32) -> u32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

/// Maps samples of `precision` bits (lossless JPEGs may use 2..=7) onto 0..=255; identity for 8.
fn rescale_lut(precision: u8) -> [u8; 256] {
    let max = (1u32 << precision.clamp(1, 8)) - 1;
    std::array::from_fn(|v| ((v as u32).min(max) * 255 / max) as u8)
}

/// Sample precision from the JPEG frame header (SOFn).
fn sof_precision(bytes: &[u8]) -> Option<u8> {
    jpeg_segments(bytes)
        .find(|(marker, _)| matches!(marker, 0xc0..=0xcf) && !matches!(marker, 0xc4 | 0xc8 | 0xcc))
        .and_then(|(_, payload)| payload.first().copied())
}

/// The marker segments before the first scan, as (marker, payload) pairs, by walking the segment lengths. Ends
/// quietly at anything malformed: callers only look for optional metadata.
pub(super) fn jpeg_segments(bytes: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut i = 2;
    std::iter::from_fn(move || {
        loop {
            if i + 4 > bytes.len() || bytes[i] != 0xff {
                return None;
            }
            let marker = bytes[i + 1];
            match marker {
                0xff => i += 1, // fill byte
                0x01 | 0xd0..=0xd7 => i += 2,
                0xd9 | 0xda => return None,
                _ => {
                    let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
                    if len < 2 {
                        return None;
                    }
                    let payload = &bytes[i + 4..(i + 2 + len).min(bytes.len())];
                    i += 2 + len;
                    return Some((marker, payload));
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------------------------
// PNG and WebP, via the `image` crate

fn decode_with_image(
    bytes: &[u8],
    format: ImageKind,
    spec: &InputSpec,
    limits: &Limits,
) -> Result<Decoded, PreprocessError> {
    let image_format = match format {
        ImageKind::Png => image::ImageFormat::Png,
        _ => image::ImageFormat::WebP,
    };
    // Room for the largest accepted image at 16-bit RGBA plus the decoder's working buffers.
    let mut image_limits = image::Limits::no_limits();
    image_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));

    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), image_format);
    if format == ImageKind::Png {
        // Read IHDR ourselves: the png crate inflates metadata chunks while reading the header, so it runs under
        // the allocation limit, but that limit is not a pixel limit and must not be what rejects a large image.
        let (w, h) = png_dimensions(bytes)?;
        check_pixels(w, h, limits)?;
        reader.limits(image_limits.clone());
    } else {
        // WebP header parsing allocates nothing proportional to the image; check our limit first, then the
        // allocation limit, so an oversized image gets the specific error.
        reader.no_limits();
    }
    let mut decoder = reader.into_decoder().map_err(|e| image_error(e, format, bytes))?;
    let (w, h) = decoder.dimensions();
    check_pixels(w, h, limits)?;
    decoder.set_limits(image_limits).map_err(|e| image_error(e, format, bytes))?;

    let orientation = match decoder.exif_metadata() {
        Ok(exif) => exif.as_deref().and_then(exif_orientation).unwrap_or(1),
        Err(e) => {
            // Metadata is optional; a broken EXIF chunk must not cost us the image.
            tracing::debug!(error = %e, %format, "ignoring unreadable EXIF metadata");
            1
        }
    };
    let image = DynamicImage::from_decoder(decoder).map_err(|e| image_error(e, format, bytes))?;
    let rgb = flatten(image, spec.fill);
    let (original_width, original_height) = oriented(w, h, orientation);
    Ok(Decoded {
        image: apply_orientation(rgb, orientation),
        format,
        original_width,
        original_height,
        dct_scale: 1,
        orientation,
        codec: Codec::Image,
    })
}

/// Width and height from the PNG IHDR chunk (always the first chunk).
fn png_dimensions(bytes: &[u8]) -> Result<(u32, u32), PreprocessError> {
    let ihdr = bytes.get(8..24).ok_or(PreprocessError::Truncated {
        format: ImageKind::Png,
        len: bytes.len(),
        source: None,
    })?;
    if &ihdr[4..8] != b"IHDR" {
        return Err(PreprocessError::Decode { format: ImageKind::Png, source: "the first chunk is not IHDR".into() });
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Ok((be(&ihdr[8..12]), be(&ihdr[12..16])))
}

fn image_error(e: image::ImageError, format: ImageKind, bytes: &[u8]) -> PreprocessError {
    let len = bytes.len();
    // `ImageError::IoError` reports the inner error's *source* as its own, skipping the io::Error itself, so the
    // chain walk alone would miss it.
    let io_eof = matches!(&e, image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof);
    // image-webp reads each chunk through a bounded reader, so running off the end of a cut-off file surfaces as a
    // bitstream error; the RIFF header's declared size tells the two apart.
    let short_riff = format == ImageKind::Webp && riff_declared_len(bytes).is_some_and(|n| len < n);
    if io_eof || short_riff || is_unexpected_eof(&e) {
        PreprocessError::Truncated { format, len, source: Some(Box::new(e)) }
    } else {
        PreprocessError::Decode { format, source: Box::new(e) }
    }
}

/// Total file length promised by a RIFF (WebP) header.
fn riff_declared_len(bytes: &[u8]) -> Option<usize> {
    let size = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    usize::try_from(size).ok()?.checked_add(8)
}

fn is_unexpected_eof(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// To RGB8; transparent pixels are composited over `matte` instead of having their (often black or garbage)
/// colour exposed.
fn flatten(image: DynamicImage, matte: [u8; 3]) -> RgbImage {
    let color = image.color();
    if !color.has_alpha() {
        // Includes 16-bit: `image` rounds 16 → 8 bits.
        return image.into_rgb8();
    }
    if color.bytes_per_pixel() / color.channel_count() == 1 {
        composite8(&image.into_rgba8(), matte)
    } else {
        composite16(&image.into_rgba16(), matte)
    }
}

fn composite8(rgba: &image::RgbaImage, matte: [u8; 3]) -> RgbImage {
    let mut out = Vec::with_capacity(rgba.width() as usize * rgba.height() as usize * 3);
    for p in rgba.as_raw().chunks_exact(4) {
        let a = u32::from(p[3]);
        for (c, m) in p[..3].iter().zip(matte) {
            out.push(((u32::from(*c) * a + u32::from(m) * (255 - a) + 127) / 255) as u8);
        }
    }
    // Invariant: exactly 3 bytes pushed per source pixel.
    RgbImage::from_raw(rgba.width(), rgba.height(), out).expect("3 bytes per pixel")
}

fn composite16(rgba: &image::ImageBuffer<image::Rgba<u16>, Vec<u16>>, matte: [u8; 3]) -> RgbImage {
    let mut out = Vec::with_capacity(rgba.width() as usize * rgba.height() as usize * 3);
    for p in rgba.as_raw().chunks_exact(4) {
        let a = u64::from(p[3]);
        for (c, m) in p[..3].iter().zip(matte) {
            let v16 = (u64::from(*c) * a + u64::from(m) * 257 * (65535 - a) + 32767) / 65535;
            out.push(((v16 * 255 + 32767) / 65535) as u8);
        }
    }
    // Invariant: exactly 3 bytes pushed per source pixel.
    RgbImage::from_raw(rgba.width(), rgba.height(), out).expect("3 bytes per pixel")
}

// ---------------------------------------------------------------------------------------------------------------
// EXIF orientation

/// The EXIF orientation tag (1..=8) from a raw EXIF block (TIFF header first; a leading `Exif\0\0`, as some WebP
/// writers leave it, is tolerated). `None` when absent or unreadable: an upright image is the safe assumption.
pub(crate) fn exif_orientation(raw: &[u8]) -> Option<u8> {
    let raw = raw.strip_prefix(b"Exif\0\0").unwrap_or(raw);
    let exif = match exif::Reader::new().read_raw(raw.to_vec()) {
        Ok(exif) => exif,
        Err(e) => {
            tracing::debug!(error = %e, "ignoring unreadable EXIF block");
            return None;
        }
    };
    let value = exif.get_field(exif::Tag::Orientation, exif::In::PRIMARY)?.value.get_uint(0)?;
    match u8::try_from(value) {
        Ok(v @ 1..=8) => Some(v),
        _ => {
            tracing::debug!(value, "ignoring out-of-range EXIF orientation");
            None
        }
    }
}

/// Turns stored pixels into displayed pixels for an EXIF orientation value.
pub(crate) fn apply_orientation(image: RgbImage, orientation: u8) -> RgbImage {
    match Orientation::from_exif(orientation) {
        None | Some(Orientation::NoTransforms) => image,
        Some(o) => {
            let mut dynamic = DynamicImage::ImageRgb8(image);
            dynamic.apply_orientation(o);
            dynamic.into_rgb8()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_by_magic_bytes() {
        assert_eq!(sniff(b"\xff\xd8\xff\xe0rest").unwrap(), ImageKind::Jpeg);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR").unwrap(), ImageKind::Png);
        assert_eq!(sniff(b"RIFF\x10\0\0\0WEBPVP8 ").unwrap(), ImageKind::Webp);
        // RIFF, but a WAV file.
        assert!(matches!(sniff(b"RIFF\x10\0\0\0WAVEfmt "), Err(PreprocessError::UnknownFormat { .. })));
        assert!(matches!(sniff(b""), Err(PreprocessError::Empty)));
        for (bytes, format) in
            [(&b"\xff\xd8"[..], ImageKind::Jpeg), (b"\x89PN", ImageKind::Png), (b"RIFF\0", ImageKind::Webp)]
        {
            match sniff(bytes) {
                Err(PreprocessError::Truncated { format: f, len, .. }) => {
                    assert_eq!((f, len), (format, bytes.len()))
                }
                other => panic!("{bytes:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn sniff_names_common_wrong_formats() {
        let cases: [(&[u8], &str); 6] = [
            (b"GIF89a\x01\0\x01\0", "GIF"),
            (b"II*\0\x08\0\0\0", "TIFF"),
            (b"\0\0\0\x18ftypheic\0\0\0\0", "HEIC/HEIF"),
            (b"\0\0\0\x1cftypavif\0\0\0\0", "AVIF"),
            (b"BM\x36\0\x0c\0\0\0\0\0\x36\0\0\0", "BMP"),
            (b"%PDF-1.7\n", "PDF"),
        ];
        for (bytes, want) in cases {
            match sniff(bytes) {
                Err(PreprocessError::UnsupportedFormat { format }) => assert_eq!(format, want),
                other => panic!("{want}: {other:?}"),
            }
        }
        let err = sniff(b"<!DOCTYPE html><html>").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unrecognised image format (first bytes: 3c 21 44 4f 43 54 59 50 45 20 68 74 \"<!DOCTYPE ht\"); \
             expected JPEG, PNG or WebP"
        );
    }

    /// A 3x2 image whose pixels are numbered 1..=6 in reading order.
    fn numbered() -> RgbImage {
        RgbImage::from_fn(3, 2, |x, y| image::Rgb([(y * 3 + x + 1) as u8; 3]))
    }

    fn labels(img: &RgbImage) -> (u32, u32, Vec<u8>) {
        (img.width(), img.height(), img.pixels().map(|p| p[0]).collect())
    }

    #[test]
    fn all_eight_orientations() {
        // Stored:  1 2 3     The displayed result for each tag, worked out by hand from the EXIF definitions
        //          4 5 6     (tag = where row 0 / column 0 of the stored image end up).
        let want: [(u8, u32, u32, [u8; 6]); 8] = [
            (1, 3, 2, [1, 2, 3, 4, 5, 6]),
            (2, 3, 2, [3, 2, 1, 6, 5, 4]), // mirrored
            (3, 3, 2, [6, 5, 4, 3, 2, 1]), // rotated 180
            (4, 3, 2, [4, 5, 6, 1, 2, 3]), // flipped vertically
            (5, 2, 3, [1, 4, 2, 5, 3, 6]), // transposed
            (6, 2, 3, [4, 1, 5, 2, 6, 3]), // needs 90 clockwise
            (7, 2, 3, [6, 3, 5, 2, 4, 1]), // transverse
            (8, 2, 3, [3, 6, 2, 5, 1, 4]), // needs 90 counter-clockwise
        ];
        for (o, w, h, px) in want {
            assert_eq!(labels(&apply_orientation(numbered(), o)), (w, h, px.to_vec()), "orientation {o}");
            assert_eq!(oriented(3, 2, o), (w, h), "orientation {o}");
        }
        // Out-of-range values leave the image alone.
        assert_eq!(labels(&apply_orientation(numbered(), 0)), labels(&numbered()));
        assert_eq!(labels(&apply_orientation(numbered(), 9)), labels(&numbered()));
    }

    /// A minimal big-endian TIFF block holding one IFD0 entry: Orientation (0x0112), SHORT, `value`.
    fn tiff_orientation(value: u16) -> Vec<u8> {
        let mut t = b"MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
        t.extend_from_slice(&value.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        t
    }

    #[test]
    fn exif_orientation_parsing() {
        for v in 1..=8u16 {
            assert_eq!(exif_orientation(&tiff_orientation(v)), Some(v as u8));
        }
        let mut prefixed = b"Exif\0\0".to_vec();
        prefixed.extend(tiff_orientation(6));
        assert_eq!(exif_orientation(&prefixed), Some(6));
        assert_eq!(exif_orientation(&tiff_orientation(0)), None);
        assert_eq!(exif_orientation(&tiff_orientation(42)), None);
        assert_eq!(exif_orientation(b"MM\0\x2agarbage"), None);
        assert_eq!(exif_orientation(b""), None);
    }

    #[test]
    fn cmyk_conversion_matches_pillow_formula() {
        // Expected values from Pillow: Image.new("CMYK", (1, 1), (c, 0, 0, k)).convert("RGB").
        for (c, k, want) in [(0, 0, 255), (255, 0, 0), (0, 255, 0), (128, 0, 127), (100, 50, 125), (37, 201, 46)] {
            let nk = 255 - k;
            assert_eq!(nk - muldiv255(c, nk), want, "c={c} k={k}");
        }
        for a in 0..=255u32 {
            for b in 0..=255u32 {
                assert_eq!(muldiv255(a, b), (a * b + 127) / 255, "{a}*{b}");
            }
        }
    }

    #[test]
    fn rescales_low_and_high_precision_samples() {
        assert_eq!(rescale_lut(8)[200], 200);
        assert_eq!(rescale_lut(4)[15], 255);
        assert_eq!(rescale_lut(4)[0], 0);
        // 12-bit grey, native-endian u16 samples as jpeg-decoder returns them for lossless L16.
        let samples: Vec<u8> = [0u16, 4095, 2048].iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut jpeg = b"\xff\xd8\xff\xc3\0\x0b\x0c\0\x01\0\x03\x01\x01\x11\0".to_vec();
        jpeg.extend_from_slice(b"\xff\xd9");
        assert_eq!(sof_precision(&jpeg), Some(12));
        let rgb = jpeg_to_rgb(samples, 3, 1, PixelFormat::L16, &jpeg).unwrap();
        assert_eq!(rgb.as_raw(), &[0, 0, 0, 255, 255, 255, 128, 128, 128]);
    }

    #[test]
    fn alpha_is_composited_over_the_matte() {
        let rgba = image::RgbaImage::from_raw(3, 1, vec![0, 0, 0, 0, 10, 20, 30, 255, 200, 0, 0, 128]).unwrap();
        let out = flatten(DynamicImage::ImageRgba8(rgba.clone()), [255, 250, 240]);
        // Transparent black becomes the matte, opaque stays, half-transparent red mixes.
        assert_eq!(out.as_raw(), &[255, 250, 240, 10, 20, 30, 227, 125, 120]);
        // The 16-bit path agrees with the 8-bit one on 8-bit-representable data.
        let rgba16 = DynamicImage::ImageRgba8(rgba).into_rgba16();
        let out16 = flatten(DynamicImage::ImageRgba16(rgba16), [255, 250, 240]);
        assert_eq!(out16.as_raw(), out.as_raw());
    }
}
