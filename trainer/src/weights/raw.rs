//! Tensors as they come out of a checkpoint file: any dtype, before name mapping and conversion to f32.

use std::fmt;

/// Element types a checkpoint may store. Only the float types convert to f32 weights; the integer ones show up in
/// real files as buffers such as `num_batches_tracked`, which import drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Typed element storage. Half-precision types keep their raw bits; see [`f16_to_f32`] and [`bf16_to_f32`].
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F64(Vec<f64>),
    F32(Vec<f32>),
    F16(Vec<u16>),
    BF16(Vec<u16>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    I16(Vec<i16>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
}

impl TensorData {
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F64(_) => DType::F64,
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::I16(_) => DType::I16,
            TensorData::I8(_) => DType::I8,
            TensorData::U8(_) => DType::U8,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorData::F64(v) => v.len(),
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) | TensorData::BF16(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I16(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes packed elements. `bytes.len()` must be a multiple of `dtype.size()`; a trailing partial element is
    /// ignored (callers check lengths before this point). `big_endian` is only ever set by torch zip archives that
    /// declare `byteorder: big`.
    pub(crate) fn decode(dtype: DType, bytes: &[u8], big_endian: bool) -> Self {
        macro_rules! decode {
            ($t:ty, $n:literal) => {
                bytes
                    .chunks_exact($n)
                    .map(|c| {
                        // chunks_exact guarantees the length, so the conversion cannot fail.
                        let a: [u8; $n] = c.try_into().unwrap_or([0; $n]);
                        if big_endian { <$t>::from_be_bytes(a) } else { <$t>::from_le_bytes(a) }
                    })
                    .collect()
            };
        }
        match dtype {
            DType::F64 => TensorData::F64(decode!(f64, 8)),
            DType::F32 => TensorData::F32(decode!(f32, 4)),
            DType::F16 => TensorData::F16(decode!(u16, 2)),
            DType::BF16 => TensorData::BF16(decode!(u16, 2)),
            DType::I64 => TensorData::I64(decode!(i64, 8)),
            DType::I32 => TensorData::I32(decode!(i32, 4)),
            DType::I16 => TensorData::I16(decode!(i16, 2)),
            DType::I8 => TensorData::I8(bytes.iter().map(|&b| b as i8).collect()),
            DType::U8 => TensorData::U8(bytes.to_vec()),
            DType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        }
    }
}

/// A tensor read from a checkpoint, dense and row-major (strided storages have already been gathered).
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl RawTensor {
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The values as f32 when the dtype is a floating-point one; `None` for integer and bool tensors, which are
    /// never weights. f64 is narrowed with rounding, which is what torch's `.float()` does.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        Some(match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            TensorData::F16(v) => v.iter().map(|&x| f16_to_f32(x)).collect(),
            TensorData::BF16(v) => v.iter().map(|&x| bf16_to_f32(x)).collect(),
            _ => return None,
        })
    }
}

/// IEEE 754 binary16 → binary32, exact for every input including subnormals, infinities and NaN payloads.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal half: mant × 2^-24. Shift the mantissa up until the implicit bit (bit 10) is set; every
            // shift lowers the exponent by one, starting from the exponent of the smallest normal half (2^-14).
            let mut e: u32 = 127 - 14;
            let mut m = mant;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

/// bfloat16 is the top half of an f32, so widening is a shift.
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_conversions_are_exact() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14));
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(bf16_to_f32(0x3fc0), 1.5);
        assert_eq!(bf16_to_f32(0xc010), -2.25);
    }

    #[test]
    fn decode_respects_byte_order() {
        let le = TensorData::decode(DType::F32, &1.5f32.to_le_bytes(), false);
        let be = TensorData::decode(DType::F32, &1.5f32.to_be_bytes(), true);
        assert_eq!(le, TensorData::F32(vec![1.5]));
        assert_eq!(le, be);
        assert_eq!(TensorData::decode(DType::I64, &[0xff; 8], false), TensorData::I64(vec![-1]));
    }
}
