//! [`Tensor`]: a GPU storage buffer with a shape and a dtype, plus host upload and download.

use crate::context::Context;
use crate::error::{Error, Result};

/// Element type of a tensor's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float (`half::f16` on the host).
    F16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
        })
    }
}

/// A host element type that maps to a [`DType`].
pub trait Element: bytemuck::Pod {
    /// The matching dtype.
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}

impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}

/// Product of the dims; `None` on overflow.
pub(crate) fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Bytes a buffer needs for `n` elements of `dtype`: rounded up to 4 (wgpu copies and writes
/// work in 4-byte units) and at least 4 (a binding cannot be empty).
pub(crate) fn padded_bytes(n: usize, dtype: DType) -> Option<u64> {
    let bytes = u64::try_from(n).ok()?.checked_mul(dtype.size() as u64)?;
    bytes.div_ceil(4).max(1).checked_mul(4)
}

/// The element count and padded byte size of a tensor of `shape` and `dtype`, checked for
/// overflow: [`Error::Shape`] naming `op` and `what` when the product or the bytes do not fit
/// in 64 bits.
pub(crate) fn checked_size(
    op: &'static str,
    what: &'static str,
    shape: &[usize],
    dtype: DType,
) -> Result<(usize, u64)> {
    numel(shape)
        .and_then(|n| Some((n, padded_bytes(n, dtype)?)))
        .ok_or_else(|| Error::shape(op, what, shape, "a size whose element and byte counts fit in 64 bits"))
}

/// A GPU tensor: a storage buffer, a shape and a dtype. Row-major (C-contiguous).
///
/// The buffer has `STORAGE | COPY_SRC | COPY_DST` usage, so it can be bound by the kernels,
/// read back and overwritten. It is padded to a multiple of 4 bytes.
///
/// A tensor belongs to the [`Context`] that made it (and that context's clones): every call
/// that takes a tensor checks this and returns [`Error::WrongDevice`] for a tensor of another
/// context, before recording anything.
#[derive(Clone, Debug)]
pub struct Tensor {
    buffer: wgpu::Buffer,
    shape: Vec<usize>,
    dtype: DType,
    /// The id of the context that made it.
    owner: u64,
}

impl Tensor {
    const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
        .union(wgpu::BufferUsages::COPY_SRC)
        .union(wgpu::BufferUsages::COPY_DST);

    fn alloc(ctx: &Context, shape: &[usize], dtype: DType) -> Result<Self> {
        let (_, bytes) = checked_size("tensor", "shape", shape, dtype)?;
        let limit = ctx.limits().max_buffer_size;
        if bytes > limit {
            return Err(Error::ExceedsLimit {
                op: "tensor",
                what: "buffer size (bytes)",
                value: bytes,
                limit,
                limit_name: "max_buffer_size",
            });
        }
        let buffer = ctx.create_buffer("normdrop tensor", bytes, Self::USAGE)?;
        Ok(Self {
            buffer,
            shape: shape.to_vec(),
            dtype,
            owner: ctx.id(),
        })
    }

    /// A zero-filled tensor (wgpu zero-initialises new buffers).
    pub fn zeros(ctx: &Context, shape: &[usize], dtype: DType) -> Result<Self> {
        Self::alloc(ctx, shape, dtype)
    }

    /// A tensor of `shape` with every element `value` (rounded to the nearest half for F16).
    /// The size is checked against the device before anything is allocated, on the GPU or the
    /// host.
    pub fn full(ctx: &Context, shape: &[usize], value: f32, dtype: DType) -> Result<Self> {
        let t = Self::alloc(ctx, shape, dtype)?;
        match dtype {
            DType::F32 => t.write(ctx, &vec![value; t.numel()])?,
            DType::F16 => t.write(ctx, &vec![half::f16::from_f32(value); t.numel()])?,
        }
        Ok(t)
    }

    /// Uploads `data` as a tensor of `shape`. `data.len()` must equal the product of `shape`.
    pub fn from_slice<T: Element>(ctx: &Context, data: &[T], shape: &[usize]) -> Result<Self> {
        if numel(shape) != Some(data.len()) {
            return Err(Error::shape(
                "tensor",
                "shape",
                shape,
                format!("{} elements to match the data", data.len()),
            ));
        }
        let t = Self::alloc(ctx, shape, T::DTYPE)?;
        t.write(ctx, data)?;
        Ok(t)
    }

    /// Uploads f32 values as a tensor of `dtype`: as they are for F32, rounded to the nearest
    /// half for F16 (exact when the values are halves already).
    pub fn from_f32(ctx: &Context, data: &[f32], shape: &[usize], dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Self::from_slice(ctx, data, shape),
            DType::F16 => {
                let h: Vec<half::f16> = data.iter().map(|&v| half::f16::from_f32(v)).collect();
                Self::from_slice(ctx, &h, shape)
            }
        }
    }

    /// Overwrites the contents with `data` (same element count and dtype).
    pub fn write<T: Element>(&self, ctx: &Context, data: &[T]) -> Result<()> {
        ctx.check_owns("tensor write", "tensor", self)?;
        if T::DTYPE != self.dtype {
            return Err(Error::DType {
                op: "tensor write",
                what: "data",
                got: T::DTYPE,
                expected: self.dtype,
            });
        }
        if data.len() != self.numel() {
            return Err(Error::shape(
                "tensor write",
                "data",
                &[data.len()],
                format!("{} elements", self.numel()),
            ));
        }
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.len().is_multiple_of(4) {
            ctx.scoped(|| ctx.queue().write_buffer(&self.buffer, 0, bytes))
        } else {
            // queue writes must be a multiple of 4 bytes: pad an odd f16 count with a zero half.
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4) * 4, 0);
            ctx.scoped(|| ctx.queue().write_buffer(&self.buffer, 0, &padded))
        }
    }

    /// Wraps an existing buffer of `ctx`'s device. It must hold `shape` in `dtype` (at least 4
    /// bytes), and have `STORAGE` and `COPY_SRC` usage for the kernels and readback.
    ///
    /// The buffer's device is checked by binding it on `ctx`'s device inside an error scope:
    /// a buffer of another device of the same wgpu instance, or a destroyed buffer, is an
    /// error. (wgpu cannot check a buffer made through another `wgpu::Instance`: handles of two
    /// instances are indices into different tables. Every context normdrop creates shares one
    /// instance; a [`Context::from_wgpu`] device must not be given buffers of another instance.)
    pub fn from_buffer(ctx: &Context, buffer: wgpu::Buffer, shape: &[usize], dtype: DType) -> Result<Self> {
        let (n, _) = checked_size("tensor", "shape", shape, dtype)?;
        // checked_size proved n·size fits in u64.
        let needed = (n as u64 * dtype.size() as u64).max(4);
        if buffer.size() < needed {
            return Err(Error::BufferTooSmall {
                op: "tensor",
                what: "buffer",
                needed,
                got: buffer.size(),
            });
        }
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::Buffer {
                op: "tensor",
                what: "buffer",
                reason: "needs STORAGE usage".into(),
            });
        }
        crate::kernels::probe_binding(ctx.device(), "tensor", "buffer", &buffer.slice(..4))?;
        Ok(Self {
            buffer,
            shape: shape.to_vec(),
            dtype,
            owner: ctx.id(),
        })
    }

    /// The id of the context that made this tensor.
    pub(crate) fn owner(&self) -> u64 {
        self.owner
    }

    /// The underlying buffer, for binding in your own passes.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// The whole tensor as a buffer slice, as the low-level kernels take it.
    pub fn slice(&self) -> wgpu::BufferSlice<'_> {
        self.buffer.slice(..)
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        numel(&self.shape).expect("checked at construction")
    }

    /// Bytes of data (without padding).
    pub fn size_bytes(&self) -> u64 {
        // Checked at construction: the byte count fits in u64.
        self.numel() as u64 * self.dtype.size() as u64
    }

    /// Downloads the contents. `T` must match the dtype.
    pub async fn to_vec<T: Element>(&self, ctx: &Context) -> Result<Vec<T>> {
        ctx.check_owns("tensor read", "tensor", self)?;
        if T::DTYPE != self.dtype {
            return Err(Error::DType {
                op: "tensor read",
                what: "destination",
                got: T::DTYPE,
                expected: self.dtype,
            });
        }
        let bytes = ctx
            .read_buffer(&self.buffer, 0, self.size_bytes().div_ceil(4).max(1) * 4)
            .await?;
        let data = &bytes[..self.size_bytes() as usize];
        // The mapped bytes need not be aligned for T; copy element-wise through pod_read.
        Ok(data
            .chunks_exact(std::mem::size_of::<T>())
            .map(bytemuck::pod_read_unaligned)
            .collect())
    }

    /// Blocking [`Tensor::to_vec`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn to_vec_blocking<T: Element>(&self, ctx: &Context) -> Result<Vec<T>> {
        pollster::block_on(self.to_vec(ctx))
    }

    /// Downloads the contents widened exactly to f64, whatever the dtype (blocking).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn to_f64_blocking(&self, ctx: &Context) -> Result<Vec<f64>> {
        Ok(match self.dtype {
            DType::F32 => self.to_vec_blocking::<f32>(ctx)?.into_iter().map(f64::from).collect(),
            DType::F16 => self
                .to_vec_blocking::<half::f16>(ctx)?
                .into_iter()
                .map(|v| f64::from(v.to_f32()))
                .collect(),
        })
    }
}
