//! The JPEG fast path: libjpeg-turbo, for the files it decodes without a single warning.
//!
//! It only ever accepts, never rejects. Whatever it declines goes to the jpeg-decoder path in `decode.rs`. That
//! covers CMYK, lossless and 12-bit files, anything over the pixel limit, any libjpeg warning (extraneous bytes, a
//! premature end, a bad Huffman code) and any error. That path stays the one place that decides what a bad JPEG is
//! and how it is reported: the truncation and limit errors, and the fuzzed behaviour on hostile input. A clean
//! file costs one libjpeg-turbo decode. A damaged one costs an extra header read or decode before the usual error.
//! Clean files are the workload.

use super::decode::{Codec, Decoded, exif_orientation, jpeg_segments, oriented};
use super::eighth::{self, Colour};
use super::resize;
use super::spec::{InputSpec, Limits};
use image::RgbImage;
use std::cell::RefCell;
use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat, ScalingFactor};

/// Progressive files with more scans than this are left to jpeg-decoder. Each scan is a pass over the whole
/// coefficient buffer, and libjpeg-turbo's documentation recommends a limit against files made of thousands of
/// tiny scans; real encoders write about 10.
const MAX_SCANS: u32 = 500;

thread_local! {
    /// One decompressor per decode thread, reused: creating one sets up libjpeg's state, and the workers decode
    /// one photo after another.
    static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
}

/// Why the fast path left a file to jpeg-decoder (logged at debug level).
#[derive(Debug)]
pub(super) struct Declined(String);

impl std::fmt::Display for Declined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Declined {
    pub(super) fn new(reason: String) -> Self {
        Declined(reason)
    }
}

fn declined(what: &str, e: impl std::fmt::Display) -> Declined {
    Declined(format!("{what}: {e}"))
}

/// The 1/8-scale decoder alone (`eighth.rs`), with the colour space from libjpeg-turbo's header as in `decode`:
/// for the differential fuzz target and the tests, which hold it to libjpeg-turbo's own 1/8 decode.
pub(super) fn one_eighth(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, Declined> {
    let (_, header) = header_within(bytes, max_pixels)?;
    let colour = one_eighth_colour(header.colorspace)
        .ok_or_else(|| Declined(format!("{:?} colour space", header.colorspace)))?;
    eighth::decode(bytes, colour)
}

/// libjpeg-turbo's own 1/8-scale decode, the reference `one_eighth` is held to (any warning is an `Err`).
pub(super) fn libjpeg_one_eighth(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, Declined> {
    let (mut d, header) = header_within(bytes, max_pixels)?;
    decompress_scaled(&mut d, bytes, &header, 8)
}

/// A fresh decompressor and the file's header, for a file of at most `max_pixels`.
fn header_within(bytes: &[u8], max_pixels: u64) -> Result<(Decompressor, turbojpeg::DecompressHeader), Declined> {
    let mut d = Decompressor::new().map_err(|e| declined("creating a decompressor", e))?;
    let header = d.read_header(bytes).map_err(|e| declined("reading the header", e))?;
    if (header.width as u64).saturating_mul(header.height as u64) > max_pixels {
        return Err(Declined("over the pixel limit".into()));
    }
    Ok((d, header))
}

/// Decodes `bytes` (already sniffed as JPEG, within the file-size limit) like `decode_jpeg`, but may use every
/// DCT reduction down to 1/8: libjpeg-turbo's scaled IDCTs round correctly (see the test
/// `libjpeg_turbo_one_eighth_scale_is_unbiased`).
pub(super) fn decode(bytes: &[u8], spec: &InputSpec, limits: &Limits) -> Result<Decoded, Declined> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match slot.as_mut() {
            Some(d) => d,
            None => {
                let mut d = Decompressor::new().map_err(|e| declined("creating a decompressor", e))?;
                d.set_scan_limit(MAX_SCANS).map_err(|e| declined("setting the scan limit", e))?;
                slot.insert(d)
            }
        };
        let result = decode_with(d, bytes, spec, limits);
        if result.is_err() {
            // libjpeg recovers its handles after an error, but a fresh one costs little next to a failed decode
            // and rules out state carried over from a hostile file.
            *slot = None;
        }
        result
    })
}

fn decode_with(d: &mut Decompressor, bytes: &[u8], spec: &InputSpec, limits: &Limits) -> Result<Decoded, Declined> {
    let header = d.read_header(bytes).map_err(|e| declined("reading the header", e))?;
    if header.is_lossless {
        return Err(Declined("lossless JPEG".into()));
    }
    if !matches!(header.colorspace, Colorspace::YCbCr | Colorspace::Gray | Colorspace::RGB) {
        return Err(Declined(format!("{:?} colour space", header.colorspace)));
    }
    let (width, height) = (u32::try_from(header.width), u32::try_from(header.height));
    let (Ok(width), Ok(height)) = (width, height) else {
        return Err(Declined("dimensions out of range".into()));
    };
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(Declined("over the pixel limit".into()));
    }
    let orientation = jpeg_segments(bytes)
        .find(|(marker, payload)| *marker == 0xe1 && payload.starts_with(b"Exif\0\0"))
        .and_then(|(_, payload)| exif_orientation(payload))
        .unwrap_or(1);
    let (upright_width, upright_height) = oriented(width, height, orientation);
    let dct_scale = resize::choose_dct_scale(spec, upright_width, upright_height, 8);
    if let (8, Some(colour)) = (dct_scale, one_eighth_colour(header.colorspace)) {
        match eighth::decode(bytes, colour) {
            Ok(rgb) => return Ok(Decoded::jpeg(rgb, (width, height), dct_scale, orientation, Codec::OneEighth)),
            Err(reason) => tracing::debug!(%reason, "decoding with libjpeg-turbo at 1/8"),
        }
    }
    let rgb = decompress_scaled(d, bytes, &header, dct_scale)?;
    Ok(Decoded::jpeg(rgb, (width, height), dct_scale, orientation, Codec::LibjpegTurbo))
}

/// libjpeg-turbo's decode of `bytes` at 1/`dct_scale` to RGB8.
fn decompress_scaled(
    d: &mut Decompressor,
    bytes: &[u8],
    header: &turbojpeg::DecompressHeader,
    dct_scale: u8,
) -> Result<RgbImage, Declined> {
    let factor = ScalingFactor::new(1, usize::from(dct_scale));
    d.set_scaling_factor(factor).map_err(|e| declined("setting the DCT scale", e))?;
    let scaled = header.scaled(factor);
    let mut pixels = vec![0u8; 3 * scaled.width * scaled.height];
    let out = Image {
        pixels: &mut pixels[..],
        width: scaled.width,
        pitch: 3 * scaled.width,
        height: scaled.height,
        format: PixelFormat::RGB,
    };
    d.decompress(bytes, out).map_err(|e| declined("decoding", e))?;
    let rgb = match (u32::try_from(scaled.width), u32::try_from(scaled.height)) {
        (Ok(w), Ok(h)) => RgbImage::from_raw(w, h, pixels),
        _ => None,
    };
    rgb.ok_or_else(|| Declined("decoded buffer does not match the image size".into()))
}

/// The colour spaces the 1/8 decoder takes, as libjpeg-turbo's header reader judged them.
fn one_eighth_colour(colorspace: Colorspace) -> Option<Colour> {
    match colorspace {
        Colorspace::YCbCr => Some(Colour::YCbCr),
        Colorspace::Gray => Some(Colour::Grey),
        _ => None,
    }
}
