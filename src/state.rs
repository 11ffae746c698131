//! safetensors (de)serialization of module state with PyTorch's dtype conventions, and the
//! little-endian decoding shared with the fixture reader.

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};
use crate::nn::batch_norm::{StateMap, StateTensor};

/// Writes `(key, tensor)` entries as a safetensors file image.
pub(crate) fn serialize(entries: &[(String, StateTensor)]) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = entries
        .iter()
        .map(|(k, t)| match t {
            StateTensor::F32 { shape, data } => (
                k.clone(),
                Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data).to_vec(),
            ),
            StateTensor::I64 { shape, data } => (
                k.clone(),
                Dtype::I64,
                shape.clone(),
                bytemuck::cast_slice(data).to_vec(),
            ),
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, dtype, shape, data)| Ok((k.as_str(), TensorView::new(*dtype, shape.clone(), data)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::tensor::serialize(views, None)?)
}

/// Reads the f32 and i64 tensors of a safetensors image (other dtypes are rejected by name).
pub(crate) fn deserialize(bytes: &[u8]) -> Result<StateMap> {
    let st = SafeTensors::deserialize(bytes)?;
    let mut out = StateMap::new();
    for (name, view) in st.iter() {
        let shape = view.shape().to_vec();
        let t = match view.dtype() {
            Dtype::F32 => StateTensor::F32 {
                shape,
                data: decode_f32(view.data()),
            },
            Dtype::I64 => StateTensor::I64 {
                shape,
                data: decode_i64(view.data()),
            },
            other => {
                return Err(Error::SafeTensors(format!(
                    "`{name}` has dtype {other:?}; state tensors are F32 or I64"
                )))
            }
        };
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

pub(crate) fn decode_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

pub(crate) fn decode_i64(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Any numeric safetensors view widened to f64 (the fixture reader's common currency).
pub(crate) fn view_to_f64(name: &str, view: &TensorView<'_>) -> Result<Vec<f64>> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        Dtype::F32 => decode_f32(b).into_iter().map(f64::from).collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::I64 => decode_i64(b).into_iter().map(|v| v as f64).collect(),
        other => return Err(Error::SafeTensors(format!("`{name}` has unsupported dtype {other:?}"))),
    })
}

/// Writes `bytes` to `path`, naming the file in the error.
pub(crate) fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Reads `path`, naming the file in the error.
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}
