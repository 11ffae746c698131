//! Module state: [`StateTensor`], one named entry of a module's state, and its safetensors
//! (de)serialization with PyTorch's dtype conventions.

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};
use std::collections::HashMap;

/// Writes `(key, tensor)` entries as a safetensors file image.
pub fn serialize(entries: &[(String, StateTensor)]) -> Result<Vec<u8>> {
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

/// The state entries of a module's f32 parameters that exist (`(name, tensor)`; all of
/// `shape`), keyed `{prefix}{name}`: read back from the GPU.
pub(crate) async fn params_state(
    ctx: &crate::Context,
    prefix: &str,
    params: &[(&str, Option<&crate::Tensor>)],
    shape: &[usize],
) -> Result<Vec<(String, StateTensor)>> {
    let mut out = Vec::new();
    for (name, t) in params {
        if let Some(t) = t {
            let data: Vec<f32> = t.to_vec(ctx).await?;
            out.push((
                format!("{prefix}{name}"),
                StateTensor::F32 {
                    shape: shape.to_vec(),
                    data,
                },
            ));
        }
    }
    Ok(out)
}

/// Loads the parameters of [`params_state`] from a safetensors image: every key must be there
/// as f32 of `shape`, and everything is checked before anything is written.
pub(crate) fn load_params(
    ctx: &crate::Context,
    bytes: &[u8],
    prefix: &str,
    params: &[(&str, Option<&crate::Tensor>)],
    shape: &[usize],
) -> Result<()> {
    let tensors = deserialize(bytes)?;
    let mut pending = Vec::new();
    for (name, t) in params {
        if let Some(t) = t {
            let key = format!("{prefix}{name}");
            let entry = tensors
                .get(&key)
                .ok_or_else(|| Error::SafeTensors(format!("missing key `{key}`")))?;
            pending.push((*t, entry.as_f32(&key, shape)?));
        }
    }
    for (t, data) in pending {
        t.write(ctx, &data)?;
    }
    Ok(())
}

/// Reads the f32 and i64 tensors of a safetensors image (other dtypes are rejected by name).
pub fn deserialize(bytes: &[u8]) -> Result<StateMap> {
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

/// Writes `bytes` to `path`, naming the file in the error.
#[cfg(not(target_arch = "wasm32"))]
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

/// One entry of a module's state.
#[derive(Clone, Debug, PartialEq)]
pub enum StateTensor {
    /// float32 data.
    F32 {
        /// Shape.
        shape: Vec<usize>,
        /// Values.
        data: Vec<f32>,
    },
    /// int64 data.
    I64 {
        /// Shape.
        shape: Vec<usize>,
        /// Values.
        data: Vec<i64>,
    },
}

impl StateTensor {
    pub(crate) fn as_f32(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self {
            StateTensor::F32 { shape: s, data } if s == shape => Ok(data.clone()),
            StateTensor::F32 { shape: s, .. } => Err(Error::SafeTensors(format!(
                "`{key}` has shape {s:?}, expected {shape:?}"
            ))),
            StateTensor::I64 { .. } => Err(Error::SafeTensors(format!("`{key}` is int64, expected float32"))),
        }
    }

    pub(crate) fn as_count(&self, key: &str) -> Result<u64> {
        match self {
            StateTensor::I64 { data, .. } if data.len() == 1 && data[0] >= 0 => Ok(data[0] as u64),
            _ => Err(Error::SafeTensors(format!("`{key}` must be one non-negative int64"))),
        }
    }
}

/// Named state tensors, as read from a file.
pub type StateMap = HashMap<String, StateTensor>;
