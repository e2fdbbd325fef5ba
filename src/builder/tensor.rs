//! Tensor payloads for initializers, constants and tensor attributes.

use super::{BuildError, DType};
use crate::onnx;

/// A dense tensor: element type, dimensions and little-endian raw bytes,
/// exactly as ONNX stores it in `TensorProto.raw_data`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorData {
    /// Element type.
    pub dtype: DType,
    /// Dimensions; empty for a scalar.
    pub dims: Vec<i64>,
    /// Little-endian element bytes (one byte per `Bool`).
    pub raw: Vec<u8>,
}

impl TensorData {
    /// Wraps raw bytes, checking that their length matches `dtype` and `dims`.
    pub fn new(dtype: DType, dims: Vec<i64>, raw: Vec<u8>) -> Result<Self, BuildError> {
        let t = TensorData { dtype, dims, raw };
        t.check("<tensor>")?;
        Ok(t)
    }

    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> i64 {
        self.dims.iter().product()
    }

    /// Checks that dims are non-negative and the byte length matches; `name`
    /// only labels the error.
    pub(crate) fn check(&self, name: &str) -> Result<(), BuildError> {
        let numel = self.dims.iter().try_fold(1usize, |acc, &d| {
            usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        });
        let expected = numel.and_then(|n| n.checked_mul(self.dtype.size_bytes()));
        match expected {
            Some(e) if e == self.raw.len() => Ok(()),
            _ => Err(BuildError::TensorSize {
                tensor: name.to_string(),
                dims: self.dims.clone(),
                dtype: self.dtype,
                bytes: self.raw.len(),
            }),
        }
    }

    /// `f32` tensor. Panics if `values.len()` does not match `dims`.
    pub fn from_f32(values: &[f32], dims: &[i64]) -> Self {
        Self::from_le(
            DType::F32,
            dims,
            values.iter().flat_map(|v| v.to_le_bytes()),
        )
    }

    /// `f16` tensor. Panics if `values.len()` does not match `dims`.
    pub fn from_f16(values: &[half::f16], dims: &[i64]) -> Self {
        Self::from_le(
            DType::F16,
            dims,
            values.iter().flat_map(|v| v.to_le_bytes()),
        )
    }

    /// `bf16` tensor. Panics if `values.len()` does not match `dims`.
    pub fn from_bf16(values: &[half::bf16], dims: &[i64]) -> Self {
        Self::from_le(
            DType::BF16,
            dims,
            values.iter().flat_map(|v| v.to_le_bytes()),
        )
    }

    /// `i64` tensor. Panics if `values.len()` does not match `dims`.
    pub fn from_i64(values: &[i64], dims: &[i64]) -> Self {
        Self::from_le(
            DType::I64,
            dims,
            values.iter().flat_map(|v| v.to_le_bytes()),
        )
    }

    /// `i32` tensor. Panics if `values.len()` does not match `dims`.
    pub fn from_i32(values: &[i32], dims: &[i64]) -> Self {
        Self::from_le(
            DType::I32,
            dims,
            values.iter().flat_map(|v| v.to_le_bytes()),
        )
    }

    /// `uint8` tensor. Panics if `values.len()` does not match `dims`.
    pub fn from_u8(values: &[u8], dims: &[i64]) -> Self {
        Self::from_le(DType::U8, dims, values.iter().copied())
    }

    /// `int8` tensor. Panics if `values.len()` does not match `dims`.
    pub fn from_i8(values: &[i8], dims: &[i64]) -> Self {
        Self::from_le(DType::I8, dims, values.iter().map(|&v| v as u8))
    }

    /// `bool` tensor. Panics if `values.len()` does not match `dims`.
    pub fn from_bool(values: &[bool], dims: &[i64]) -> Self {
        Self::from_le(DType::Bool, dims, values.iter().map(|&v| u8::from(v)))
    }

    /// A scalar of `dtype` holding `x`, rounded to the type (float types round
    /// to nearest, integer types truncate, `Bool` is `x != 0`).
    pub fn scalar(dtype: DType, x: f64) -> Self {
        match dtype {
            DType::F32 => Self::from_f32(&[x as f32], &[]),
            DType::F16 => Self::from_f16(&[half::f16::from_f64(x)], &[]),
            DType::BF16 => Self::from_bf16(&[half::bf16::from_f64(x)], &[]),
            DType::I64 => Self::from_i64(&[x as i64], &[]),
            DType::I32 => Self::from_i32(&[x as i32], &[]),
            DType::Bool => Self::from_bool(&[x != 0.0], &[]),
            DType::U8 => Self::from_u8(&[x as u8], &[]),
            DType::I8 => Self::from_i8(&[x as i8], &[]),
        }
    }

    fn from_le(dtype: DType, dims: &[i64], bytes: impl Iterator<Item = u8>) -> Self {
        let t = TensorData {
            dtype,
            dims: dims.to_vec(),
            raw: bytes.collect(),
        };
        if let Err(e) = t.check("<tensor>") {
            panic!("{e}");
        }
        t
    }

    /// The `TensorProto` holding this tensor in `raw_data`; moves the bytes
    /// so a large weight is never held twice.
    pub fn into_proto(self, name: &str) -> onnx::TensorProto {
        onnx::TensorProto {
            name: name.to_string(),
            dims: self.dims,
            data_type: self.dtype.onnx() as i32,
            raw_data: self.raw,
            ..Default::default()
        }
    }
}
