//! Plain SGD, `p ← p − lr·g`, for training loops that keep everything on the GPU.

use crate::context::Kernel;
use crate::error::{Error, Result};
use crate::kernels::{
    bind_group, binding, check_device, compute_pipeline, fold_workgroups, uniform_buffer, BindLimits, CallArgs,
};

const OP: &str = "sgd";

/// Entry points in `shaders/sgd/sgd.wgsl` that get a pipeline.
pub(crate) const ENTRY_POINTS: &[&str] = &["sgd_step"];

/// Mirrors `struct Params` in `shaders/sgd/sgd.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct SgdParams {
    n: u32,
    lr: f32,
    _pad0: u32,
    _pad1: u32,
}
const _: () = assert!(std::mem::size_of::<SgdParams>() == 16);

/// The compiled SGD pipeline for one device.
#[derive(Clone, Debug)]
pub struct SgdKernel {
    device: wgpu::Device,
    step: wgpu::ComputePipeline,
}

impl Kernel for SgdKernel {
    fn build(device: &wgpu::Device, _storage: crate::kernels::Storage) -> Self {
        let module = crate::kernels::shader_module(device, "sgd/sgd.wgsl", crate::kernels::Storage::F32, false);
        Self {
            device: device.clone(),
            step: compute_pipeline(device, &module, "sgd_step"),
        }
    }
}

impl SgdKernel {
    /// Compiles the pipeline.
    pub fn new(device: &wgpu::Device) -> Self {
        <Self as Kernel>::build(device, crate::kernels::Storage::F32)
    }

    /// A plan updating `n` parameters with learning rate `lr` (finite).
    pub fn plan(&self, device: &wgpu::Device, n: usize, lr: f32) -> Result<SgdPlan> {
        check_device(OP, &self.device, device)?;
        if !lr.is_finite() {
            return Err(Error::invalid(OP, format!("learning rate must be finite, got {lr}")));
        }
        if n == 0 || n as u64 > 1 << 31 {
            return Err(Error::invalid(
                OP,
                format!("parameter count must be in 1..=2^31, got {n}"),
            ));
        }
        let limits = BindLimits::of(device);
        let params = SgdParams {
            n: n as u32,
            lr,
            _pad0: 0,
            _pad1: 0,
        };
        let uniform = uniform_buffer(device, "sgd params", &params);
        Ok(SgdPlan {
            kernel: self.clone(),
            n: n as u64,
            limits,
            uniform,
            groups: fold_workgroups(OP, (n as u64).div_ceil(256), limits.max_workgroups_per_dim)?,
        })
    }
}

/// An SGD step for one parameter count and learning rate.
#[derive(Debug)]
pub struct SgdPlan {
    kernel: SgdKernel,
    n: u64,
    limits: BindLimits,
    uniform: wgpu::Buffer,
    groups: (u32, u32),
}

impl SgdPlan {
    /// Records `param ← param − lr·grad` (f32, `n` elements each, distinct buffers).
    pub fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        param: &wgpu::BufferSlice<'_>,
        grad: &wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        let k = &self.kernel;
        check_device(OP, &k.device, device)?;
        let bytes = self.n * 4;
        let mut args = CallArgs::new(OP, &self.limits);
        args.write("param", param, bytes)?;
        args.read("grad", grad, bytes)?;
        args.check_aliasing()?;
        args.record(device, encoder, "sgd", || {
            let group = bind_group(
                device,
                "sgd_step",
                &k.step,
                &[
                    (0, self.uniform.as_entire_binding()),
                    (1, binding(param, bytes)),
                    (2, binding(grad, bytes)),
                ],
            );
            Ok(vec![(&k.step, group, self.groups)])
        })
    }
}
