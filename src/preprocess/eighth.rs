//! Clean baseline JPEGs at 1/8 scale, decoded from little more than their DC terms: the studio-photo fast path.
//!
//! At 1/8 scale every 8×8 block becomes one pixel (its DC term), so the AC terms are never used, but a sequential
//! JPEG stores no block lengths: every AC symbol still has to be parsed to find where the next block starts.
//! libjpeg-turbo does that symbol by symbol, one table lookup for the code and another step for the magnitude
//! bits, and on a 24 MP photo that parsing was 82 % of the whole preprocessing time (docs/benchmarks.md, P5).
//! Here one lookup takes as many whole symbols as start within the next 12 bits (two or three on a photo), with
//! their code and magnitude lengths and zero runs together; the byte stuffing is removed first, so the bit reader
//! refills without a branch.
//!
//! The output is **byte-identical to libjpeg-turbo's 1/8-scale decode** (tests `one_eighth_decoder_…` in
//! tests/it/preprocess.rs, on real photos in every layout libjpeg writes, and the `one_eighth` fuzz target): the
//! same 1×1 "IDCT" (DC × quantiser / 8 with libjpeg's wrapping range limit), the same reduced 2×2 IDCT for 4:2:0
//! chroma (libjpeg scales those components by IDCT rather than by upsampling, and that IDCT reads the odd AC
//! terms, so chroma blocks are decoded in full), the same pixel-replicating upsampling (libjpeg turns its smooth
//! upsampling off at 1/8) and the same YCbCr tables. So the model sees exactly what it saw before, and what the
//! trainer sees.
//!
//! Like `turbo.rs` it only ever accepts. Anything but a clean, single-scan, 8-bit Huffman baseline file in grey,
//! 4:4:4, 4:2:2, 4:2:0 (or other layouts needing only a 1×1 or 2×2 IDCT and integral upsampling) is declined and
//! goes on to libjpeg-turbo, which then decides (and reports) what a bad file is. "Clean" is at least as strict
//! as libjpeg's "no warning": extra bytes before a marker, a wrong restart marker, a bad Huffman code or data that
//! runs out all decline, and so do chroma terms so damaged that libjpeg-turbo's own C and SIMD IDCTs disagree.
//! The colour space is libjpeg-turbo's header verdict, passed in by the caller, so a file is never read as YCbCr
//! here and as RGB there.

use super::turbo::Declined;
use image::RgbImage;

/// Bits looked up at once: enough for two or three of the short AC symbols that make up most of a photo's data,
/// in tables L1 holds (8 KiB to decode, 16 KiB to skip).
const LUT_BITS: u32 = 12;

/// Zigzag position → natural (row-major) position, extended with 16 × 63 the way libjpeg extends it: a corrupt run
/// that overshoots position 63 lands on 63 instead of outside the block, silently, and the 2×2 IDCT reads that term.
const NATURAL: [u8; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54,
    47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
];

/// libjpeg's post-IDCT range limit, indexed by `value & 1023`: centred on 128, clamped, and wrapping for values
/// beyond ±512 (what a corrupt but warning-free file can produce). Kept exact so such files match too.
static IDCT_RANGE: [u8; 1024] = {
    let mut t = [0u8; 1024];
    let mut i = 0;
    while i < 1024 {
        t[i] = match i {
            0..=127 => (i + 128) as u8,
            128..=511 => 255,
            512..=895 => 0,
            _ => (i - 896) as u8,
        };
        i += 1;
    }
    t
};

/// The example tables of the JPEG standard (ITU T.81, Annex K.3), which libjpeg puts in Huffman slots 0
/// (luminance) and 1 (chrominance) that a file leaves empty (`std_huff_tables`): Motion-JPEG camera frames omit
/// them. Counts per code length 1..=16, then the symbols.
const STANDARD_TABLES: [[(&[u8; 16], &[u8]); 2]; 2] = [
    [(&DC_LUMA_COUNTS, &DC_VALUES), (&DC_CHROMA_COUNTS, &DC_VALUES)],
    [(&AC_LUMA_COUNTS, &AC_LUMA_VALUES), (&AC_CHROMA_COUNTS, &AC_CHROMA_VALUES)],
];
/// Both DC tables code the magnitude categories 0 to 11.
const DC_VALUES: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
const DC_LUMA_COUNTS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
const DC_CHROMA_COUNTS: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
const AC_LUMA_COUNTS: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 125];
#[rustfmt::skip]
const AC_LUMA_VALUES: [u8; 162] = [
    0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07, 0x22, 0x71, 0x14,
    0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52, 0xd1, 0xf0, 0x24, 0x33, 0x62, 0x72, 0x82, 0x09,
    0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a,
    0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65,
    0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88,
    0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9,
    0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca,
    0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea,
    0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
];
const AC_CHROMA_COUNTS: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 119];
#[rustfmt::skip]
const AC_CHROMA_VALUES: [u8; 162] = [
    0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61, 0x71, 0x13, 0x22, 0x32,
    0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33, 0x52, 0xf0, 0x15, 0x62, 0x72, 0xd1, 0x0a, 0x16,
    0x24, 0x34, 0xe1, 0x25, 0xf1, 0x17, 0x18, 0x19, 0x1a, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x35, 0x36, 0x37, 0x38, 0x39,
    0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64,
    0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x82, 0x83, 0x84, 0x85, 0x86,
    0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7,
    0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8,
    0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9,
    0xea, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
];

fn declined(what: impl Into<String>) -> Declined {
    Declined::new(format!("1/8 decoder: {}", what.into()))
}

/// Which colour space the caller's header reader found; everything else is declined before this point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Colour {
    Grey,
    YCbCr,
}

/// Decodes `bytes` at 1/8 scale, or declines: `ceil(width / 8)` × `ceil(height / 8)` RGB8 pixels, as stored (not
/// yet upright).
pub(super) fn decode(bytes: &[u8], colour: Colour) -> Result<RgbImage, Declined> {
    let file = parse(bytes)?;
    let frame = &file.frame;
    match (colour, frame.components.len()) {
        (Colour::Grey, 1) | (Colour::YCbCr, 3) => {}
        (c, n) => return Err(declined(format!("{c:?} with {n} components"))),
    }
    let planes = decode_scan(bytes, &file)?;
    to_rgb(frame, &planes)
}

struct Component {
    id: u8,
    h: usize,
    v: usize,
    quant: usize,
    /// Output pixels per block side: 1, or 2 where libjpeg scales the component up by a 2×2 IDCT.
    idct: usize,
}

struct Frame {
    width: usize,
    height: usize,
    components: Vec<Component>,
    h_max: usize,
    v_max: usize,
}

/// The Huffman tables a scan uses, each built once (the chroma components usually share theirs).
struct ScanTables {
    built: Vec<HuffTable>,
    /// Per component, in frame order: its (DC, AC) tables' indices in `built`.
    components: Vec<(usize, usize)>,
}

struct File {
    frame: Frame,
    /// Quantisers in natural order.
    quant: [Option<[u16; 64]>; 4],
    tables: ScanTables,
    restart_interval: usize,
    /// Offset of the first entropy-coded byte.
    scan_start: usize,
}

/// Walks the markers up to the (only) scan. Any marker or parameter outside what is supported declines.
// Out of line: see `destuff`.
#[inline(never)]
fn parse(bytes: &[u8]) -> Result<File, Declined> {
    let mut pos = 2; // after SOI, which the sniffer checked
    let mut frame: Option<Frame> = None;
    let mut quant: [Option<[u16; 64]>; 4] = [None; 4];
    let mut dht: [[Option<RawTable>; 4]; 2] = Default::default();
    let mut restart_interval = 0;
    loop {
        if bytes.get(pos) != Some(&0xFF) {
            return Err(declined(format!("no marker at byte {pos}")));
        }
        let marker = *bytes.get(pos + 1).ok_or_else(|| declined("file ends in a marker"))?;
        let len = match bytes.get(pos + 2..pos + 4) {
            Some(&[a, b]) => usize::from(u16::from_be_bytes([a, b])),
            _ => return Err(declined("file ends in a segment header")),
        };
        let payload = len.checked_sub(2).and_then(|n| bytes.get(pos + 4..pos + 4 + n));
        let payload = payload.ok_or_else(|| declined(format!("segment {marker:#04x} is cut off")))?;
        pos += 2 + len;
        match marker {
            0xE0..=0xEF | 0xFE => {}
            0xDB => parse_dqt(payload, &mut quant)?,
            0xC4 => parse_dht(payload, &mut dht)?,
            0xDD => {
                let &[a, b] = payload else { return Err(declined("DRI segment length")) };
                restart_interval = usize::from(u16::from_be_bytes([a, b]));
            }
            0xC0 | 0xC1 if frame.is_none() => frame = Some(parse_sof(payload)?),
            0xDA => {
                let frame = frame.ok_or_else(|| declined("scan before the frame header"))?;
                for (class, tables) in STANDARD_TABLES.iter().enumerate() {
                    for (id, &(counts, values)) in tables.iter().enumerate() {
                        dht[class][id].get_or_insert_with(|| RawTable { counts: *counts, values: values.to_vec() });
                    }
                }
                let tables = parse_sos(payload, &frame, &dht)?;
                for c in &frame.components {
                    if quant[c.quant].is_none() {
                        return Err(declined("missing quantisation table"));
                    }
                }
                return Ok(File { frame, quant, tables, restart_interval, scan_start: pos });
            }
            0xC2 | 0xC6 | 0xCA | 0xCE => return Err(declined("progressive")),
            0xC3 | 0xC7 | 0xCB | 0xCF => return Err(declined("lossless")),
            0xC9 => return Err(declined("arithmetic coding")),
            other => return Err(declined(format!("marker {other:#04x}"))),
        }
    }
}

fn parse_dqt(mut p: &[u8], quant: &mut [Option<[u16; 64]>; 4]) -> Result<(), Declined> {
    while let Some((&pq_tq, rest)) = p.split_first() {
        let (precision, id) = (pq_tq >> 4, usize::from(pq_tq & 15));
        let size = if precision == 0 { 64 } else { 128 };
        if precision > 1 || id > 3 || rest.len() < size {
            return Err(declined("DQT segment"));
        }
        let mut table = [0u16; 64];
        for (k, &natural) in NATURAL[..64].iter().enumerate() {
            let q =
                if precision == 0 { u16::from(rest[k]) } else { u16::from_be_bytes([rest[2 * k], rest[2 * k + 1]]) };
            // libjpeg's SIMD build multiplies in 16-bit signed integers: a larger quantiser would wrap there.
            if q > i16::MAX as u16 {
                return Err(declined("quantiser over 32767"));
            }
            table[usize::from(natural)] = q;
        }
        quant[id] = Some(table);
        p = &rest[size..];
    }
    Ok(())
}

#[derive(Clone)]
struct RawTable {
    counts: [u8; 16],
    values: Vec<u8>,
}

fn parse_dht(mut p: &[u8], dht: &mut [[Option<RawTable>; 4]; 2]) -> Result<(), Declined> {
    while p.len() >= 17 {
        let (class, id) = (usize::from(p[0] >> 4), usize::from(p[0] & 15));
        if class > 1 || id > 3 {
            return Err(declined("DHT table class or id"));
        }
        let mut counts = [0u8; 16];
        counts.copy_from_slice(&p[1..17]);
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        let values = p.get(17..17 + total).ok_or_else(|| declined("DHT segment length"))?;
        if total > 256 {
            return Err(declined("DHT table with over 256 codes"));
        }
        dht[class][id] = Some(RawTable { counts, values: values.to_vec() });
        p = &p[17 + total..];
    }
    if p.is_empty() { Ok(()) } else { Err(declined("DHT segment length")) }
}

fn parse_sof(p: &[u8]) -> Result<Frame, Declined> {
    let (&[precision, h0, h1, w0, w1, n], rest) = p.split_at_checked(6).ok_or_else(|| declined("SOF length"))? else {
        return Err(declined("SOF length"));
    };
    if precision != 8 {
        return Err(declined(format!("{precision}-bit samples")));
    }
    let (height, width) = (usize::from(u16::from_be_bytes([h0, h1])), usize::from(u16::from_be_bytes([w0, w1])));
    if width == 0 || height == 0 {
        return Err(declined("zero width or height"));
    }
    let n = usize::from(n);
    if !(n == 1 || n == 3) || rest.len() != 3 * n {
        return Err(declined(format!("{n} components")));
    }
    let mut components: Vec<Component> = rest
        .chunks_exact(3)
        .map(|c| Component {
            id: c[0],
            h: usize::from(c[1] >> 4),
            v: usize::from(c[1] & 15),
            quant: usize::from(c[2]),
            idct: 1,
        })
        .collect();
    if components.iter().any(|c| !(1..=4).contains(&c.h) || !(1..=4).contains(&c.v) || c.quant > 3) {
        return Err(declined("sampling factor or quantiser id"));
    }
    if n > 1 && components.iter().map(|c| c.h * c.v).sum::<usize>() > 10 {
        // libjpeg's limit for an interleaved scan (D_MAX_BLOCKS_IN_MCU), checked only when it decodes.
        return Err(declined("more than 10 blocks per MCU"));
    }
    if n == 1 {
        // A single component is one non-interleaved scan whatever its factors say.
        components[0].h = 1;
        components[0].v = 1;
    }
    let h_max = components.iter().map(|c| c.h).max().unwrap_or(1);
    let v_max = components.iter().map(|c| c.v).max().unwrap_or(1);
    for c in &mut components {
        // libjpeg's choice (jdmaster.c): grow a component's IDCT size while that still divides the sampling ratio,
        // so that chroma is scaled up by the IDCT rather than by upsampling.
        let mut size = 1;
        while size < 8 && h_max % (c.h * size * 2) == 0 && v_max % (c.v * size * 2) == 0 {
            size *= 2;
        }
        if size > 2 || h_max % (c.h * size) != 0 || v_max % (c.v * size) != 0 {
            return Err(declined(format!("sampling {}x{} of {h_max}x{v_max}", c.h, c.v)));
        }
        c.idct = size;
    }
    Ok(Frame { width, height, components, h_max, v_max })
}

fn parse_sos(p: &[u8], frame: &Frame, dht: &[[Option<RawTable>; 4]; 2]) -> Result<ScanTables, Declined> {
    let n = usize::from(*p.first().ok_or_else(|| declined("SOS length"))?);
    if p.len() != 4 + 2 * n {
        return Err(declined("SOS length"));
    }
    if n != frame.components.len() {
        return Err(declined("a scan without every component (multi-scan file)"));
    }
    if p[1 + 2 * n..] != [0, 63, 0] {
        return Err(declined("not a sequential scan"));
    }
    let mut built: Vec<((usize, u8), HuffTable)> = Vec::new();
    let mut table = |class: usize, id: u8| -> Result<usize, Declined> {
        if let Some(i) = built.iter().position(|(key, _)| *key == (class, id)) {
            return Ok(i);
        }
        let raw = dht[class].get(usize::from(id)).and_then(Option::as_ref);
        let raw = raw.ok_or_else(|| declined("missing Huffman table"))?;
        built.push(((class, id), HuffTable::new(raw, class == 0)?));
        Ok(built.len() - 1)
    };
    let mut components = Vec::with_capacity(n);
    for (i, c) in frame.components.iter().enumerate() {
        let (id, td_ta) = (p[1 + 2 * i], p[2 + 2 * i]);
        if id != c.id {
            return Err(declined("scan components out of frame order"));
        }
        components.push((table(0, td_ta >> 4)?, table(1, td_ta & 15)?));
    }
    Ok(ScanTables { built: built.into_iter().map(|(_, t)| t).collect(), components })
}

/// One Huffman table, for decoding and for skipping.
struct HuffTable {
    /// By the next `LUT_BITS` bits: `code length << 8 | symbol`, or 0 when the code is longer.
    decode: Box<[u16; 1 << LUT_BITS]>,
    /// By the next `LUT_BITS` bits, for skipping AC terms: as many whole AC symbols as start within those bits
    /// (`Skip`), or 0 when the first code is longer.
    skip: Box<[u32; 1 << LUT_BITS]>,
    /// Largest code of each length (index 1..=16), -1 where there is none.
    max_code: [i32; 17],
    /// Index into `values` of the first code of each length, minus that code.
    offset: [i32; 17],
    values: Vec<u8>,
}

/// A `HuffTable::skip` entry: several AC symbols taken at once.
struct Skip;

impl Skip {
    /// Bits of all the symbols, codes and magnitudes (≤ LUT_BITS + 15).
    const BITS: u32 = 0x3F;
    /// How far they move the coefficient index (0 for end-of-block), shifted by 6.
    const ADVANCE: u32 = 6;
    /// Set when the last of them is end-of-block.
    const EOB: u32 = 1 << 14;
    /// How far all but the last move the index, shifted by 15: if that reaches 64 the block ends earlier, inside
    /// the entry, and the symbols are taken one at a time instead.
    const BEFORE_LAST: u32 = 15;
}

/// The AC run/size symbol's move of the coefficient index: run + 1, or 0 for end-of-block.
fn advance(symbol: u8) -> u32 {
    let (run, size) = (u32::from(symbol >> 4), symbol & 15);
    if size == 0 && run != 15 { 0 } else { run + 1 }
}

impl HuffTable {
    fn new(raw: &RawTable, dc: bool) -> Result<HuffTable, Declined> {
        if dc && raw.values.iter().any(|&v| v > 15) {
            return Err(declined("DC symbol over 15"));
        }
        let mut decode = Box::new([0u16; 1 << LUT_BITS]);
        let mut max_code = [-1i32; 17];
        let mut offset = [0i32; 17];
        let (mut code, mut k) = (0u32, 0usize);
        for len in 1..=16u32 {
            let count = usize::from(raw.counts[len as usize - 1]);
            offset[len as usize] = k as i32 - code as i32;
            for &symbol in &raw.values[k..k + count] {
                // As libjpeg: the codes of each length must fit it (and none may be all ones, checked below).
                if code >= 1 << len {
                    return Err(declined("bad Huffman table"));
                }
                if len <= LUT_BITS {
                    let shift = LUT_BITS - len;
                    let entry = (len << 8 | u32::from(symbol)) as u16;
                    decode[(code << shift) as usize..((code + 1) << shift) as usize].fill(entry);
                }
                code += 1;
            }
            k += count;
            if count > 0 {
                max_code[len as usize] = code as i32 - 1;
            }
            if code >= 1 << len {
                return Err(declined("bad Huffman table"));
            }
            code <<= 1;
        }
        let mut skip = Box::new([0u32; 1 << LUT_BITS]);
        if !dc {
            for (prefix, entry) in skip.iter_mut().enumerate() {
                *entry = skip_entry(&decode, prefix as u32);
            }
        }
        Ok(HuffTable { decode, skip, max_code, offset, values: raw.values.clone() })
    }
}

/// The `Skip` entry for `LUT_BITS` bits of data: the symbols whose codes lie wholly within them, in order, up to
/// end-of-block. A symbol's magnitude bits may run past them (they are skipped, not read), but then it is the last.
fn skip_entry(decode: &[u16; 1 << LUT_BITS], prefix: u32) -> u32 {
    let (mut at, mut advance_sum, mut before_last) = (0u32, 0u32, 0u32);
    let mut eob = false;
    while at < LUT_BITS {
        // The bits from `at` on, zero-filled: a code found there is real only if it ends within the prefix.
        let e = decode[((prefix << at) & ((1 << LUT_BITS) - 1)) as usize];
        let len = u32::from(e >> 8);
        if e == 0 || at + len > LUT_BITS {
            break;
        }
        let symbol = e as u8;
        before_last = advance_sum;
        advance_sum += advance(symbol);
        at += len + u32::from(symbol & 15);
        if advance(symbol) == 0 {
            eob = true;
            break;
        }
    }
    if at == 0 {
        return 0;
    }
    at | advance_sum << Skip::ADVANCE | if eob { Skip::EOB } else { 0 } | before_last << Skip::BEFORE_LAST
}

/// The scan's entropy-coded data with the byte stuffing taken out, cut at its restart markers. Taking the
/// stuffing out first (one `memchr` pass) is what lets the bit reader refill without a branch per byte.
struct Entropy {
    data: Vec<u8>,
    /// Each restart interval's bytes in `data`.
    intervals: Vec<std::ops::Range<usize>>,
    /// The marker that ended the scan.
    end_marker: u8,
}

/// `max_intervals` is how many restart intervals the image has: more markers than that decline at once, so a
/// flood of them costs no memory.
// Out of line, like `parse`: inlined into `decode`, the cold parsing changed how the decode loop was compiled and
// cost 8 % (P5, measured).
#[inline(never)]
fn destuff(bytes: &[u8], start: usize, max_intervals: usize) -> Result<Entropy, Declined> {
    let mut data = Vec::with_capacity(bytes.len().saturating_sub(start));
    let mut intervals = Vec::new();
    let (mut from, mut at) = (0, start);
    loop {
        let rest = bytes.get(at..).unwrap_or_default();
        let ff = memchr::memchr(0xFF, rest).ok_or_else(|| declined("no marker after the entropy-coded data"))?;
        data.extend_from_slice(&rest[..ff]);
        at += ff;
        match bytes.get(at + 1) {
            Some(0) => data.push(0xFF),
            Some(&m @ 0xD0..=0xD7) => {
                if bytes.get(at + 2..at + 4) == Some(&[0xFF, 0xD9]) {
                    // A restart marker right before EOI, whatever its number, as some phones write: libjpeg
                    // passes over it with a trace message, not a warning.
                    intervals.push(from..data.len());
                    return Ok(Entropy { data, intervals, end_marker: 0xD9 });
                }
                if intervals.len() + 1 >= max_intervals {
                    return Err(declined("more restart markers than restart intervals"));
                }
                let expected = 0xD0 + (intervals.len() % 8) as u8;
                if m != expected {
                    return Err(declined(format!("restart marker {m:#04x} where {expected:#04x} belongs")));
                }
                intervals.push(from..data.len());
                from = data.len();
            }
            // Fill bytes before a marker, or the end of the file: not clean.
            Some(0xFF) | None => {
                return Err(declined("fill bytes or the end of the file after the entropy-coded data"));
            }
            Some(&m) => {
                intervals.push(from..data.len());
                return Ok(Entropy { data, intervals, end_marker: m });
            }
        }
        at += 2;
    }
}

/// A bit stream over one restart interval of destuffed data. Reading past the interval's end reads the next
/// interval (or zeros after the last); `finish` then declines the file, as libjpeg warns on such data.
struct Bits<'a> {
    data: &'a [u8],
    /// Next byte to load.
    pos: usize,
    /// Unconsumed bits, most significant first. Bits below `count` are the true next bits of the stream or zero,
    /// which is what lets `refill` OR in a whole 8-byte load.
    buf: u64,
    count: u32,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Bits { data, pos, buf: 0, count: 0 }
    }

    /// Tops the buffer up to at least 56 bits without a data-dependent branch (Giesen's "variant 4").
    #[inline(always)]
    fn refill(&mut self) {
        let w = match self.data.get(self.pos..self.pos + 8) {
            Some(w) => u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]),
            None => self.tail(),
        };
        self.buf |= w >> self.count;
        self.pos += ((63 - self.count) >> 3) as usize;
        self.count |= 56;
    }

    /// The last bytes of the data, padded with zeros.
    #[cold]
    fn tail(&self) -> u64 {
        let mut w = [0u8; 8];
        let rest = self.data.get(self.pos..).unwrap_or_default();
        w[..rest.len().min(8)].copy_from_slice(&rest[..rest.len().min(8)]);
        u64::from_be_bytes(w)
    }

    #[inline(always)]
    fn consume(&mut self, n: u32) {
        self.buf <<= n;
        self.count -= n;
    }

    /// One Huffman symbol. After a `refill`, the 56 bits buffered cover a code (≤ 16) and its magnitude (≤ 15).
    #[inline(always)]
    fn symbol(&mut self, t: &HuffTable) -> Result<u8, Declined> {
        let e = t.decode[(self.buf >> (64 - LUT_BITS)) as usize];
        if e != 0 {
            self.consume(u32::from(e >> 8));
            return Ok(e as u8);
        }
        let (len, symbol) = long_code(self.buf, t)?;
        self.consume(len);
        Ok(symbol)
    }

    /// `size` magnitude bits as a signed value (JPEG's EXTEND); `size <= 15` and that many bits are buffered.
    #[inline(always)]
    fn extend(&mut self, size: u32) -> i32 {
        if size == 0 {
            return 0;
        }
        let bits = (self.buf >> (64 - size)) as i32;
        self.consume(size);
        if bits < 1 << (size - 1) { bits - (1 << size) + 1 } else { bits }
    }

    /// Skips the AC terms of a block whose pixels come from its DC term alone: the hot loop of the whole decoder,
    /// two or three symbols per lookup on a typical photo.
    #[inline(always)]
    fn skip_ac(&mut self, t: &HuffTable) -> Result<(), Declined> {
        let skip = &*t.skip;
        let mut k = 1;
        loop {
            self.refill();
            let e = skip[(self.buf >> (64 - LUT_BITS)) as usize];
            if e != 0 && k + (e >> Skip::BEFORE_LAST) < 64 {
                self.consume(e & Skip::BITS);
                k += (e >> Skip::ADVANCE) & 0xFF;
                if e & Skip::EOB != 0 || k >= 64 {
                    return Ok(());
                }
            } else {
                // A long code, or the block ends inside the entry: one symbol.
                let symbol = self.symbol(t)?;
                self.consume(u32::from(symbol & 15));
                k += advance(symbol);
                if advance(symbol) == 0 || k >= 64 {
                    return Ok(());
                }
            }
        }
    }

    /// Decodes the AC terms of a block into `block` (natural order), which is all zeros on entry.
    #[inline(always)]
    fn decode_ac(&mut self, t: &HuffTable, block: &mut [i16; 64]) -> Result<(), Declined> {
        let mut k = 1usize;
        while k < 64 {
            self.refill();
            let symbol = self.symbol(t)?;
            let (run, size) = (usize::from(symbol >> 4), u32::from(symbol & 15));
            if size == 0 {
                if run != 15 {
                    break;
                }
                k += 16;
                continue;
            }
            k += run;
            // Truncating to 16 bits is what libjpeg's JCOEF store does.
            block[usize::from(NATURAL[k])] = self.extend(size) as i16;
            k += 1;
        }
        Ok(())
    }

    /// Bits consumed since `start`.
    fn consumed(&self, start: usize) -> usize {
        (self.pos - start) * 8 - self.count as usize
    }
}

/// A code longer than `LUT_BITS` at the top of `buf`: its length and symbol.
#[cold]
#[inline(never)]
fn long_code(buf: u64, t: &HuffTable) -> Result<(u32, u8), Declined> {
    for len in LUT_BITS + 1..=16 {
        let code = (buf >> (64 - len)) as i32;
        if code <= t.max_code[len as usize] {
            let at = (code + t.offset[len as usize]) as usize;
            return Ok((len, *t.values.get(at).ok_or_else(|| declined("bad Huffman code"))?));
        }
    }
    Err(declined("bad Huffman code"))
}

/// The decoded planes: one byte per output sample, at each component's own (1/8-scaled) resolution.
struct Planes {
    planes: Vec<Vec<u8>>,
    /// Row length of each plane.
    strides: Vec<usize>,
}

fn decode_scan(bytes: &[u8], file: &File) -> Result<Planes, Declined> {
    let frame = &file.frame;
    let single = frame.components.len() == 1;
    let (mcus_x, mcus_y) = if single {
        (frame.width.div_ceil(8), frame.height.div_ceil(8))
    } else {
        (frame.width.div_ceil(8 * frame.h_max), frame.height.div_ceil(8 * frame.v_max))
    };
    let mut planes = Vec::with_capacity(frame.components.len());
    let mut strides = Vec::with_capacity(frame.components.len());
    for c in &frame.components {
        let stride = mcus_x * c.h * c.idct;
        strides.push(stride);
        planes.push(vec![0u8; stride * mcus_y * c.v * c.idct]);
    }
    let quant: Vec<&[u16; 64]> = frame
        .components
        .iter()
        .map(|c| file.quant[c.quant].as_ref().ok_or_else(|| declined("missing quantisation table")))
        .collect::<Result<_, _>>()?;
    let total = mcus_x * mcus_y;
    let per_interval = if file.restart_interval == 0 { total } else { file.restart_interval };
    let entropy = destuff(bytes, file.scan_start, total.div_ceil(per_interval))?;
    if entropy.end_marker != 0xD9 {
        return Err(declined("a marker other than EOI after the scan"));
    }
    if entropy.intervals.len() != total.div_ceil(per_interval) {
        return Err(declined("restart markers do not match the restart interval"));
    }
    let mut last_dc = vec![0i32; frame.components.len()];
    for (i, range) in entropy.intervals.iter().enumerate() {
        let mut bits = Bits::new(&entropy.data, range.start);
        last_dc.iter_mut().for_each(|dc| *dc = 0);
        for mcu in i * per_interval..((i + 1) * per_interval).min(total) {
            let (mx, my) = (mcu % mcus_x, mcu / mcus_x);
            for (ci, c) in frame.components.iter().enumerate() {
                let (dc, ac) = file.tables.components[ci];
                let (dc_table, ac_table) = (&file.tables.built[dc], &file.tables.built[ac]);
                let q = quant[ci];
                for v in 0..c.v {
                    for h in 0..c.h {
                        bits.refill();
                        let size = u32::from(bits.symbol(dc_table)?);
                        let diff = bits.extend(size);
                        let dc = last_dc[ci].checked_add(diff).ok_or_else(|| declined("DC term overflows"))?;
                        last_dc[ci] = dc;
                        let (bx, by) = (mx * c.h + h, my * c.v + v);
                        if c.idct == 1 {
                            bits.skip_ac(ac_table)?;
                            let value = i32::from(dc as i16) * i32::from(q[0]);
                            planes[ci][by * strides[ci] + bx] = IDCT_RANGE[(((value + 4) >> 3) & 1023) as usize];
                        } else {
                            let mut block = [0i16; 64];
                            block[0] = dc as i16;
                            bits.decode_ac(ac_table, &mut block)?;
                            let out = idct_2x2(&block, q)
                                .ok_or_else(|| declined("chroma terms beyond what libjpeg's IDCTs agree on"))?;
                            let (stride, at) = (strides[ci], 2 * by * strides[ci] + 2 * bx);
                            planes[ci][at..at + 2].copy_from_slice(&out[0]);
                            planes[ci][at + stride..at + stride + 2].copy_from_slice(&out[1]);
                        }
                    }
                }
            }
            if bits.pos > range.end + 8 {
                // Far past the interval already: the data is short. Stop rather than decode the rest of the file.
                return Err(declined("entropy-coded data ends early"));
            }
        }
        // Everything the blocks read must have been this interval's data, and only the last byte's padding may
        // be left over (whole bytes left over are libjpeg's "extraneous bytes before marker").
        let (used, len) = (bits.consumed(range.start), 8 * range.len());
        if used > len {
            return Err(declined("entropy-coded data ends early"));
        }
        if len - used >= 8 {
            return Err(declined("extraneous bytes before a marker"));
        }
    }
    Ok(Planes { planes, strides })
}

/// libjpeg's reduced 2×2 inverse DCT (`jpeg_idct_2x2`, islow constants), to the bit; `None` outside the range
/// where all of libjpeg-turbo's implementations agree.
///
/// Its C code computes in 64 bits and wraps the result through the range-limit table; its x86 SIMD code
/// multiplies in 16 bits, saturates the workspace to 16 bits and clamps the result. The two agree, and this
/// agrees with both, as long as no dequantised term or workspace value leaves 16 bits, no sum leaves 32, and no
/// result is beyond ±384. Real photos stay far inside that (a dequantised term is a DCT value of 8-bit samples,
/// within about ±1,100); only damaged data leaves it, and such a file is declined to libjpeg-turbo itself.
fn idct_2x2(block: &[i16; 64], q: &[u16; 64]) -> Option<[[u8; 2]; 2]> {
    const FIX_0_720959822: i64 = 5906;
    const FIX_0_850430095: i64 = 6967;
    const FIX_1_272758580: i64 = 10426;
    const FIX_3_624509785: i64 = 29692;
    let in_i16 = |x: i64| (-32768..=32767).contains(&x);
    let in_i32 = |x: i64| i32::try_from(x).is_ok();
    let odd = |t1: i64, t3: i64, t5: i64, t7: i64| {
        t7 * -FIX_0_720959822 + t5 * FIX_0_850430095 + t3 * -FIX_1_272758580 + t1 * FIX_3_624509785
    };
    let deq = |i: usize| {
        let v = i64::from(block[i]) * i64::from(q[i]);
        in_i16(v).then_some(v)
    };
    // Pass 1, columns 0, 1, 3, 5 and 7 (2, 4 and 6 do not reach a 2×2 output): CONST_BITS 13, PASS1_BITS 2.
    let mut ws = [[0i64; 8]; 2];
    for col in [0, 1, 3, 5, 7] {
        // Workspace column 0 is shifted by 15 in 32 bits later; the others are packed into 16 bits.
        let fits = |v: i64| if col == 0 { (-65535..=65535).contains(&v) } else { in_i16(v) };
        if block[8 + col] == 0 && block[24 + col] == 0 && block[40 + col] == 0 && block[56 + col] == 0 {
            // No odd terms: the full formula below reduces to this exactly. Most columns of a photo's chroma.
            let value = deq(col)? << 2;
            if !fits(value) {
                return None;
            }
            ws[0][col] = value;
            ws[1][col] = value;
            continue;
        }
        let even = deq(col)? << 15;
        let odd = odd(deq(8 + col)?, deq(24 + col)?, deq(40 + col)?, deq(56 + col)?);
        for (r, sum) in [even + odd, even - odd].into_iter().enumerate() {
            let value = (sum + (1 << 12)) >> 13;
            if !in_i32(sum + (1 << 12)) || !fits(value) {
                return None;
            }
            ws[r][col] = value;
        }
    }
    // Pass 2, rows: descale by CONST_BITS + PASS1_BITS + 3 + 2.
    let mut out = [[0u8; 2]; 2];
    for (row, pixels) in ws.iter().zip(&mut out) {
        let even = row[0] << 15;
        let odd = odd(row[1], row[3], row[5], row[7]);
        for (sum, pixel) in [even + odd, even - odd].into_iter().zip(pixels.iter_mut()) {
            let value = (sum + (1 << 19)) >> 20;
            if !in_i32(sum + (1 << 19)) || !(-384..384).contains(&value) {
                return None;
            }
            *pixel = (value.clamp(-128, 127) + 128) as u8;
        }
    }
    Some(out)
}

/// libjpeg's YCbCr → RGB tables (jdcolor.c), in 16-bit fixed point.
struct YccTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i32; 256],
    cb_g: [i32; 256],
}

static YCC: std::sync::LazyLock<YccTables> = std::sync::LazyLock::new(|| {
    let fix = |x: f64| (x * 65536.0 + 0.5) as i32;
    let half = 1 << 15;
    let mut t = YccTables { cr_r: [0; 256], cb_b: [0; 256], cr_g: [0; 256], cb_g: [0; 256] };
    for i in 0..256 {
        let x = i as i32 - 128;
        t.cr_r[i] = (fix(1.40200) * x + half) >> 16;
        t.cb_b[i] = (fix(1.77200) * x + half) >> 16;
        t.cr_g[i] = -fix(0.71414) * x;
        t.cb_g[i] = -fix(0.34414) * x + half;
    }
    t
});

fn to_rgb(frame: &Frame, planes: &Planes) -> Result<RgbImage, Declined> {
    let (width, height) = (frame.width.div_ceil(8), frame.height.div_ceil(8));
    let mut rgb = vec![0u8; 3 * width * height];
    let clamp = |x: i32| x.clamp(0, 255) as u8;
    if frame.components.len() == 1 {
        let (plane, stride) = (&planes.planes[0], planes.strides[0]);
        for (y, row) in rgb.chunks_exact_mut(3 * width).enumerate() {
            for (px, &g) in row.chunks_exact_mut(3).zip(&plane[y * stride..y * stride + width]) {
                px.fill(g);
            }
        }
    } else {
        let t = &*YCC;
        // Integral upsampling by replication: output pixel x reads sample x / factor of each component.
        let factor = |c: &Component| (frame.h_max / (c.h * c.idct), frame.v_max / (c.v * c.idct));
        let f = [factor(&frame.components[0]), factor(&frame.components[1]), factor(&frame.components[2])];
        for (y, row) in rgb.chunks_exact_mut(3 * width).enumerate() {
            let line = |i: usize| {
                let at = (y / f[i].1) * planes.strides[i];
                &planes.planes[i][at..at + planes.strides[i]]
            };
            let (ys, cbs, crs) = (line(0), line(1), line(2));
            if f.iter().all(|&(h, _)| h == 1) {
                for (((px, &yy), &cb), &cr) in row.chunks_exact_mut(3).zip(ys).zip(cbs).zip(crs) {
                    ycc_pixel(t, px, yy, cb, cr, clamp);
                }
            } else {
                for (x, px) in row.chunks_exact_mut(3).enumerate() {
                    ycc_pixel(t, px, ys[x / f[0].0], cbs[x / f[1].0], crs[x / f[2].0], clamp);
                }
            }
        }
    }
    let size = (u32::try_from(width), u32::try_from(height));
    let image = match size {
        (Ok(w), Ok(h)) => RgbImage::from_raw(w, h, rgb),
        _ => None,
    };
    image.ok_or_else(|| declined("image size out of range"))
}

#[inline(always)]
fn ycc_pixel(t: &YccTables, px: &mut [u8], y: u8, cb: u8, cr: u8, clamp: impl Fn(i32) -> u8) {
    let (y, cb, cr) = (i32::from(y), usize::from(cb), usize::from(cr));
    px[0] = clamp(y + t.cr_r[cr]);
    px[1] = clamp(y + ((t.cb_g[cb] + t.cr_g[cr]) >> 16));
    px[2] = clamp(y + t.cb_b[cb]);
}
