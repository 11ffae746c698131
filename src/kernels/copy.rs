//! A vec4 copy kernel: the memory-bandwidth yardstick that `normdrop bench` measures every op
//! against on the same adapter.

use crate::context::Kernel;
use crate::error::{Error, Result};
use crate::kernels::{bind_group, binding, compute_pipeline, fold_workgroups, record, uniform_buffer, BindLimits};

const OP: &str = "copy";

/// Entry points in `shaders/copy.wgsl` that get a pipeline.
pub(crate) const ENTRY_POINTS: &[&str] = &["copy_vec4"];

/// The compiled copy pipeline.
#[derive(Clone, Debug)]
pub struct CopyKernel {
    copy: wgpu::ComputePipeline,
}

impl Kernel for CopyKernel {
    fn build(device: &wgpu::Device, _storage: crate::kernels::Storage) -> Self {
        let module = crate::kernels::shader_module(device, "copy.wgsl", crate::kernels::Storage::F32, false);
        Self {
            copy: compute_pipeline(device, &module, "copy_vec4"),
        }
    }
}

impl CopyKernel {
    /// A plan copying `n` f32 values (`n` a multiple of 4).
    pub fn plan(&self, device: &wgpu::Device, n: usize) -> Result<CopyPlan> {
        if n == 0 || !n.is_multiple_of(4) || n as u64 > 1 << 31 {
            return Err(Error::invalid(
                OP,
                format!("element count must be a positive multiple of 4 up to 2^31, got {n}"),
            ));
        }
        let limits = BindLimits::of(device);
        let n4 = (n / 4) as u32;
        let uniform = uniform_buffer(device, "copy params", &[n4, 0u32, 0, 0]);
        Ok(CopyPlan {
            kernel: self.clone(),
            bytes: n as u64 * 4,
            limits,
            uniform,
            groups: fold_workgroups(OP, u64::from(n4).div_ceil(256), limits.max_workgroups_per_dim)?,
        })
    }
}

/// A copy of one size.
#[derive(Debug)]
pub struct CopyPlan {
    kernel: CopyKernel,
    bytes: u64,
    limits: BindLimits,
    uniform: wgpu::Buffer,
    groups: (u32, u32),
}

impl CopyPlan {
    /// Bytes copied (each is read once and written once).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Records `dst = src`.
    pub fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        src: &wgpu::BufferSlice<'_>,
        dst: &wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        self.limits.check(OP, "src", src, self.bytes)?;
        self.limits.check(OP, "dst", dst, self.bytes)?;
        if src.buffer() == dst.buffer() {
            return Err(Error::Buffer {
                op: OP,
                what: "dst",
                reason: "shares a buffer with `src`".into(),
            });
        }
        let k = &self.kernel;
        let group = bind_group(
            device,
            "copy_vec4",
            &k.copy,
            &[
                (0, self.uniform.as_entire_binding()),
                (1, binding(src, self.bytes)),
                (2, binding(dst, self.bytes)),
            ],
        );
        record(encoder, "copy", &[(&k.copy, group, (self.groups.0, self.groups.1))]);
        Ok(())
    }
}
