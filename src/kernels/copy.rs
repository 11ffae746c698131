//! A vec4 copy kernel: the memory-bandwidth yardstick that `normdrop bench` measures every op
//! against on the same adapter.

use crate::context::Kernel;
use crate::error::{Error, Result};
use crate::kernels::{
    bind_group, binding, check_device, compute_pipeline, fold_workgroups, uniform_buffer, BindLimits, CallArgs,
};

const OP: &str = "copy";

/// Entry points in `shaders/copy/copy.wgsl` that get a pipeline.
pub(crate) const ENTRY_POINTS: &[&str] = &["copy_vec4", "copy_vec4_x4"];

/// How many 16-byte quads one invocation of the copy moves. The bandwidth yardstick is the
/// faster of the two on the adapter at hand: GPUs reach their copy bandwidth with one quad per
/// invocation, a CPU driver (lavapipe) only when a fixed per-invocation cost is spread over
/// several.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyGrain {
    /// `copy_vec4`: quad `i` per invocation.
    One,
    /// `copy_vec4_x4`: quads `g`, `g + t`, `g + 2t`, `g + 3t` per invocation, `t = ⌈n/16⌉`
    /// invocations.
    Four,
}

impl CopyGrain {
    /// Both grains, in the order `normdrop bench` measures them.
    pub const ALL: [CopyGrain; 2] = [CopyGrain::One, CopyGrain::Four];

    /// Quads per invocation.
    pub fn quads(self) -> u64 {
        match self {
            CopyGrain::One => 1,
            CopyGrain::Four => 4,
        }
    }
}

/// The compiled copy pipelines, one per [`CopyGrain`].
#[derive(Clone, Debug)]
pub struct CopyKernel {
    device: wgpu::Device,
    one: wgpu::ComputePipeline,
    four: wgpu::ComputePipeline,
}

impl Kernel for CopyKernel {
    fn build(device: &wgpu::Device, _storage: crate::kernels::Storage) -> Self {
        let module = crate::kernels::shader_module(device, "copy/copy.wgsl", crate::kernels::Storage::F32, false);
        Self {
            device: device.clone(),
            one: compute_pipeline(device, &module, "copy_vec4"),
            four: compute_pipeline(device, &module, "copy_vec4_x4"),
        }
    }
}

impl CopyKernel {
    /// A plan copying `n` f32 values (`n` a multiple of 4), one quad per invocation.
    pub fn plan(&self, device: &wgpu::Device, n: usize) -> Result<CopyPlan> {
        self.plan_with(device, n, CopyGrain::One)
    }

    /// A plan copying `n` f32 values (`n` a multiple of 4) with `grain` quads per invocation.
    pub fn plan_with(&self, device: &wgpu::Device, n: usize, grain: CopyGrain) -> Result<CopyPlan> {
        check_device(OP, &self.device, device)?;
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
            grain,
            bytes: n as u64 * 4,
            limits,
            uniform,
            groups: fold_workgroups(
                OP,
                u64::from(n4).div_ceil(grain.quads()).div_ceil(256),
                limits.max_workgroups_per_dim,
            )?,
        })
    }
}

/// A copy of one size.
#[derive(Debug)]
pub struct CopyPlan {
    kernel: CopyKernel,
    grain: CopyGrain,
    bytes: u64,
    limits: BindLimits,
    uniform: wgpu::Buffer,
    groups: (u32, u32),
}

impl CopyPlan {
    /// Quads per invocation.
    pub fn grain(&self) -> CopyGrain {
        self.grain
    }

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
        check_device(OP, &self.kernel.device, device)?;
        let mut args = CallArgs::new(OP, &self.limits);
        args.read("src", src, self.bytes)?;
        args.write("dst", dst, self.bytes)?;
        args.check_aliasing()?;
        let pipeline = match self.grain {
            CopyGrain::One => &self.kernel.one,
            CopyGrain::Four => &self.kernel.four,
        };
        args.record(device, encoder, "copy", || {
            let group = bind_group(
                device,
                "copy_vec4",
                pipeline,
                &[
                    (0, self.uniform.as_entire_binding()),
                    (1, binding(src, self.bytes)),
                    (2, binding(dst, self.bytes)),
                ],
            );
            Ok(vec![(pipeline, group, self.groups)])
        })
    }
}
