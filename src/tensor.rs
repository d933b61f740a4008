//! Tensor datatypes and the conversions between the protocol's three encodings of tensor
//! data: raw little-endian bytes (gRPC `raw_*_contents`, HTTP binary extension), typed proto
//! contents, and JSON arrays. Raw bytes are infergate's one internal form.
//!
//! Nothing here allocates from a size the client declared: buffers grow with the data that
//! actually arrived, and element counts are checked against shapes by the caller.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

use crate::proto::inference::{InferParameter, InferTensorContents};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    Bf16,
    /// Variable-length byte strings, each framed by a 4-byte little-endian length.
    Bytes,
}

impl DataType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "BOOL" => Self::Bool,
            "UINT8" => Self::U8,
            "UINT16" => Self::U16,
            "UINT32" => Self::U32,
            "UINT64" => Self::U64,
            "INT8" => Self::I8,
            "INT16" => Self::I16,
            "INT32" => Self::I32,
            "INT64" => Self::I64,
            "FP16" => Self::F16,
            "FP32" => Self::F32,
            "FP64" => Self::F64,
            "BF16" => Self::Bf16,
            "BYTES" => Self::Bytes,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "UINT8",
            Self::U16 => "UINT16",
            Self::U32 => "UINT32",
            Self::U64 => "UINT64",
            Self::I8 => "INT8",
            Self::I16 => "INT16",
            Self::I32 => "INT32",
            Self::I64 => "INT64",
            Self::F16 => "FP16",
            Self::F32 => "FP32",
            Self::F64 => "FP64",
            Self::Bf16 => "BF16",
            Self::Bytes => "BYTES",
        }
    }

    /// Bytes per element; `None` for BYTES, whose elements vary in length.
    pub fn byte_size(self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::U8 | Self::I8 => 1,
            Self::U16 | Self::I16 | Self::F16 | Self::Bf16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
            Self::Bytes => return None,
        })
    }
}

/// Number of elements of a shape; `None` if a dimension is negative or the product overflows.
pub fn element_count(shape: &[i64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| {
        let d = u64::try_from(d).ok()?;
        acc.checked_mul(d)
    })
}

pub fn shape_str(shape: &[i64]) -> String {
    let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
    format!("[{}]", dims.join(","))
}

/// Splits a raw BYTES tensor into its elements, checking the framing.
pub fn split_bytes_elements(raw: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(format!(
                "BYTES data ends with {} stray bytes where a 4-byte length was expected",
                rest.len()
            ));
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        rest = &rest[4..];
        if len > rest.len() {
            return Err(format!(
                "BYTES element {} declares {len} bytes but only {} remain",
                out.len(),
                rest.len()
            ));
        }
        out.push(&rest[..len]);
        rest = &rest[len..];
    }
    Ok(out)
}

pub fn count_bytes_elements(raw: &[u8]) -> Result<u64, String> {
    split_bytes_elements(raw).map(|v| v.len() as u64)
}

fn put_bytes_element(buf: &mut BytesMut, s: &[u8]) -> Result<(), String> {
    let len = u32::try_from(s.len()).map_err(|_| "a BYTES element exceeds 4 GiB".to_string())?;
    buf.put_u32_le(len);
    buf.put_slice(s);
    Ok(())
}

/// Typed proto contents → raw bytes. Returns the bytes and the element count found.
pub fn contents_to_raw(dtype: DataType, c: &InferTensorContents) -> Result<(Bytes, u64), String> {
    let mut buf = BytesMut::new();
    let n = match dtype {
        DataType::Bool => {
            c.bool_contents.iter().for_each(|&b| buf.put_u8(b as u8));
            c.bool_contents.len()
        }
        DataType::I8 => put_narrow(&mut buf, &c.int_contents, |b, v: i8| b.put_i8(v))?,
        DataType::I16 => put_narrow(&mut buf, &c.int_contents, |b, v: i16| b.put_i16_le(v))?,
        DataType::I32 => {
            c.int_contents.iter().for_each(|&v| buf.put_i32_le(v));
            c.int_contents.len()
        }
        DataType::I64 => {
            c.int64_contents.iter().for_each(|&v| buf.put_i64_le(v));
            c.int64_contents.len()
        }
        DataType::U8 => put_narrow(&mut buf, &c.uint_contents, |b, v: u8| b.put_u8(v))?,
        DataType::U16 => put_narrow(&mut buf, &c.uint_contents, |b, v: u16| b.put_u16_le(v))?,
        DataType::U32 => {
            c.uint_contents.iter().for_each(|&v| buf.put_u32_le(v));
            c.uint_contents.len()
        }
        DataType::U64 => {
            c.uint64_contents.iter().for_each(|&v| buf.put_u64_le(v));
            c.uint64_contents.len()
        }
        DataType::F32 => {
            c.fp32_contents.iter().for_each(|&v| buf.put_f32_le(v));
            c.fp32_contents.len()
        }
        DataType::F64 => {
            c.fp64_contents.iter().for_each(|&v| buf.put_f64_le(v));
            c.fp64_contents.len()
        }
        DataType::Bytes => {
            for s in &c.bytes_contents {
                put_bytes_element(&mut buf, s)?;
            }
            c.bytes_contents.len()
        }
        DataType::F16 | DataType::Bf16 => {
            return Err(format!(
                "{} has no typed contents field: send it in raw_input_contents",
                dtype.as_str()
            ));
        }
    };
    Ok((buf.freeze(), n as u64))
}

fn put_narrow<S: Copy + std::fmt::Display, T: TryFrom<S>>(
    buf: &mut BytesMut,
    values: &[S],
    put: impl Fn(&mut BytesMut, T),
) -> Result<usize, String> {
    for &v in values {
        let t = T::try_from(v).map_err(|_| {
            format!(
                "value {v} does not fit the datatype ({})",
                std::any::type_name::<T>()
            )
        })?;
        put(buf, t);
    }
    Ok(values.len())
}

/// JSON data (flat or nested row-major arrays) → raw bytes, with the element count.
pub fn json_to_raw(dtype: DataType, data: &Value) -> Result<(Bytes, u64), String> {
    let mut buf = BytesMut::new();
    let mut count = 0u64;
    let mut stack = vec![data];
    // Depth-first walk that keeps row-major order: push children in reverse.
    while let Some(v) = stack.pop() {
        if let Value::Array(items) = v {
            stack.extend(items.iter().rev());
            continue;
        }
        put_json_scalar(&mut buf, dtype, v).map_err(|e| format!("element {count}: {e}"))?;
        count += 1;
    }
    Ok((buf.freeze(), count))
}

fn put_json_scalar(buf: &mut BytesMut, dtype: DataType, v: &Value) -> Result<(), String> {
    let int = |v: &Value| v.as_i64().ok_or_else(|| format!("{v} is not an integer"));
    let uint = |v: &Value| {
        v.as_u64()
            .ok_or_else(|| format!("{v} is not a non-negative integer"))
    };
    let float = |v: &Value| v.as_f64().ok_or_else(|| format!("{v} is not a number"));
    fn fit<T: TryFrom<i128>>(x: i128, name: &str) -> Result<T, String> {
        T::try_from(x).map_err(|_| format!("{x} does not fit {name}"))
    }
    match dtype {
        DataType::Bool => {
            buf.put_u8(v.as_bool().ok_or_else(|| format!("{v} is not a boolean"))? as u8)
        }
        DataType::I8 => buf.put_i8(fit(int(v)?.into(), "INT8")?),
        DataType::I16 => buf.put_i16_le(fit(int(v)?.into(), "INT16")?),
        DataType::I32 => buf.put_i32_le(fit(int(v)?.into(), "INT32")?),
        DataType::I64 => buf.put_i64_le(int(v)?),
        DataType::U8 => buf.put_u8(fit(uint(v)?.into(), "UINT8")?),
        DataType::U16 => buf.put_u16_le(fit(uint(v)?.into(), "UINT16")?),
        DataType::U32 => buf.put_u32_le(fit(uint(v)?.into(), "UINT32")?),
        DataType::U64 => buf.put_u64_le(uint(v)?),
        DataType::F16 => buf.put_u16_le(half::f16::from_f64(float(v)?).to_bits()),
        DataType::Bf16 => buf.put_u16_le(half::bf16::from_f64(float(v)?).to_bits()),
        DataType::F32 => buf.put_f32_le(float(v)? as f32),
        DataType::F64 => buf.put_f64_le(float(v)?),
        DataType::Bytes => {
            let s = v.as_str().ok_or_else(|| format!("{v} is not a string"))?;
            put_bytes_element(buf, s.as_bytes())?;
        }
    }
    Ok(())
}

/// Raw bytes → a flat JSON array, as Triton's HTTP API returns output data.
pub fn raw_to_json(dtype: DataType, raw: &[u8]) -> Result<Value, String> {
    if dtype == DataType::Bytes {
        return Ok(Value::Array(
            split_bytes_elements(raw)?
                .into_iter()
                .map(|s| Value::String(String::from_utf8_lossy(s).into_owned()))
                .collect(),
        ));
    }
    let size = dtype.byte_size().expect("fixed-size datatype");
    if !raw.len().is_multiple_of(size) {
        return Err(format!(
            "{} bytes are not a whole number of {} elements",
            raw.len(),
            dtype.as_str()
        ));
    }
    let values = raw.chunks_exact(size).map(|c| -> Value {
        macro_rules! le {
            ($t:ty) => {
                <$t>::from_le_bytes(c.try_into().expect("chunk of element size"))
            };
        }
        match dtype {
            DataType::Bool => Value::Bool(c[0] != 0),
            DataType::I8 => (c[0] as i8).into(),
            DataType::I16 => le!(i16).into(),
            DataType::I32 => le!(i32).into(),
            DataType::I64 => le!(i64).into(),
            DataType::U8 => c[0].into(),
            DataType::U16 => le!(u16).into(),
            DataType::U32 => le!(u32).into(),
            DataType::U64 => le!(u64).into(),
            DataType::F16 => f64::from(half::f16::from_bits(le!(u16))).into(),
            DataType::Bf16 => f64::from(half::bf16::from_bits(le!(u16))).into(),
            DataType::F32 => float_json(le!(f32).into()),
            DataType::F64 => float_json(le!(f64)),
            DataType::Bytes => unreachable!("handled above"),
        }
    });
    Ok(Value::Array(values.collect()))
}

// JSON has no NaN/Infinity; Triton writes them as null too.
fn float_json(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// A request parameter from its JSON value (the HTTP protocol's form).
pub fn param_from_json(v: &Value) -> Result<InferParameter, String> {
    use crate::proto::inference::infer_parameter::ParameterChoice;
    let choice = match v {
        Value::Bool(b) => ParameterChoice::BoolParam(*b),
        Value::String(s) => ParameterChoice::StringParam(s.clone()),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                ParameterChoice::Int64Param(i)
            } else if let Some(u) = n.as_u64() {
                ParameterChoice::Uint64Param(u)
            } else {
                ParameterChoice::DoubleParam(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        _ => return Err("a parameter must be a boolean, number or string".into()),
    };
    Ok(InferParameter {
        parameter_choice: Some(choice),
    })
}

/// A parameter's JSON value.
pub fn param_to_json(p: &InferParameter) -> Value {
    use crate::proto::inference::infer_parameter::ParameterChoice;
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => Value::from(*b),
        Some(ParameterChoice::Int64Param(i)) => Value::from(*i),
        Some(ParameterChoice::Uint64Param(u)) => Value::from(*u),
        Some(ParameterChoice::DoubleParam(d)) => Value::from(*d),
        Some(ParameterChoice::StringParam(s)) => Value::from(s.clone()),
        None => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_roundtrips_through_raw_for_every_type() {
        let cases = [
            (DataType::Bool, json!([true, false])),
            (DataType::I8, json!([-128, 127])),
            (DataType::I16, json!([-3, 300])),
            (DataType::I32, json!([[1, -2], [3, 4]])),
            (DataType::I64, json!([i64::MIN, i64::MAX])),
            (DataType::U8, json!([0, 255])),
            (DataType::U16, json!([65535])),
            (DataType::U32, json!([4_000_000_000u64])),
            (DataType::U64, json!([u64::MAX])),
            (DataType::F16, json!([1.5, -2.0])),
            (DataType::Bf16, json!([1.0, 256.0])),
            (DataType::F32, json!([0.25, -1.5])),
            (DataType::F64, json!([1e300])),
            (DataType::Bytes, json!(["héllo", ""])),
        ];
        for (dt, data) in cases {
            let (raw, n) = json_to_raw(dt, &data).unwrap();
            let back = raw_to_json(dt, &raw).unwrap();
            let flat: Vec<Value> = match &data {
                Value::Array(a) if a.iter().all(Value::is_array) => a
                    .iter()
                    .flat_map(|r| r.as_array().unwrap().clone())
                    .collect(),
                Value::Array(a) => a.clone(),
                _ => unreachable!(),
            };
            assert_eq!(n as usize, flat.len(), "{dt:?}");
            assert_eq!(back, Value::Array(flat), "{dt:?}");
        }
    }

    #[test]
    fn out_of_range_and_wrong_kinds_are_named() {
        let e = json_to_raw(DataType::U8, &json!([1, 256])).unwrap_err();
        assert!(e.contains("element 1") && e.contains("UINT8"), "{e}");
        let e = json_to_raw(DataType::I32, &json!([1.5])).unwrap_err();
        assert!(e.contains("not an integer"), "{e}");
        let e = json_to_raw(DataType::Bytes, &json!([1])).unwrap_err();
        assert!(e.contains("not a string"), "{e}");
    }

    #[test]
    fn bytes_framing_is_checked() {
        let mut ok = BytesMut::new();
        put_bytes_element(&mut ok, b"ab").unwrap();
        put_bytes_element(&mut ok, b"").unwrap();
        assert_eq!(count_bytes_elements(&ok).unwrap(), 2);
        // A declared length far beyond the data must not be trusted.
        let lying = [0xff, 0xff, 0xff, 0x7f, b'a'];
        assert!(
            count_bytes_elements(&lying)
                .unwrap_err()
                .contains("declares")
        );
        assert!(count_bytes_elements(&[1, 0]).unwrap_err().contains("stray"));
    }

    #[test]
    fn element_count_rejects_negative_and_overflow() {
        assert_eq!(element_count(&[2, 3, 4]), Some(24));
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[2, -1]), None);
        assert_eq!(element_count(&[i64::MAX, i64::MAX]), None);
    }

    #[test]
    fn typed_contents_become_raw() {
        let c = InferTensorContents {
            int_contents: vec![1, -1],
            ..Default::default()
        };
        let (raw, n) = contents_to_raw(DataType::I16, &c).unwrap();
        assert_eq!((raw.as_ref(), n), (&[1u8, 0, 0xff, 0xff][..], 2));
        let big = InferTensorContents {
            int_contents: vec![70_000],
            ..Default::default()
        };
        assert!(contents_to_raw(DataType::I16, &big).is_err());
        assert!(contents_to_raw(DataType::F16, &c).is_err());
    }
}
