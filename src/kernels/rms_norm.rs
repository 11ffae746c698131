//! RMSNorm's low-level kernels, forward and backward: LayerNorm's passes (every geometry but
//! the CPU row-per-subgroup one, binding ranges, f32/f16/packed f16, vec4) compiled with the
//! `RMS` override constant (`shaders/layer_norm/forward_common.wgsl`, `backward_common.wgsl`):
//!
//! ```text
//! forward   rstd = 1/sqrt(mean(x²) + eps)      y = x·rstd·γ
//! backward  x̂ = x·rstd   g = dy·γ   dx = rstd·(g − x̂·mean(g·x̂))   dγ = Σ_rows dy·x̂
//! ```
//!
//! mean(x²) is formed from the row's Welford triple as var + mean² (two non-negative terms),
//! accumulated in f32 for f16 activations too.

use crate::context::Kernel;
use crate::error::{Error, Result};
use crate::grad::Accumulate;
use crate::kernels::dropout::DropoutConfig;
use crate::kernels::layer_norm::{
    LayerNormBuffers, LayerNormFusion, LayerNormKernel, LayerNormPlan, LayerNormPlanOptions,
};
use crate::kernels::layer_norm_backward::{LayerNormBackwardBuffers, LayerNormBackwardKernel, LayerNormBackwardPlan};
use crate::kernels::norm_configs::{rename, RmsNormConfig};
use crate::kernels::Storage;

const OP: &str = "rms_norm";
const OP_BACKWARD: &str = "rms_norm backward";

/// Compiled RMSNorm forward pipelines for one device and activation storage.
#[derive(Clone, Debug)]
pub struct RmsNormKernel(LayerNormKernel);

impl Kernel for RmsNormKernel {
    fn build(device: &wgpu::Device, storage: Storage) -> Self {
        Self(LayerNormKernel::build_with(device, storage, true))
    }
}

/// The buffers of one RMSNorm forward (activations stored as the kernel's [`Storage`]).
#[derive(Clone, Debug)]
pub struct RmsNormBuffers<'a> {
    /// Input `(*, normalized_shape)`.
    pub x: wgpu::BufferSlice<'a>,
    /// Output, same shape.
    pub y: wgpu::BufferSlice<'a>,
    /// γ `(W)`, f32; required with `elementwise_affine`.
    pub weight: Option<wgpu::BufferSlice<'a>>,
    /// Output `(rows)`, f32: `1/sqrt(mean(x²) + eps)`, for backward.
    pub rstd: wgpu::BufferSlice<'a>,
}

/// The buffers of one residual RMSNorm block (`h = residual + dropout(x)`, `y = RMSNorm(h)`).
#[derive(Clone, Debug)]
pub struct RmsNormResidualBuffers<'a> {
    /// The branch's output, dropped.
    pub x: wgpu::BufferSlice<'a>,
    /// The residual stream, same shape.
    pub residual: wgpu::BufferSlice<'a>,
    /// Output `h`, same shape (the next residual stream; backward reads it).
    pub h: wgpu::BufferSlice<'a>,
    /// Output `y`, same shape.
    pub y: wgpu::BufferSlice<'a>,
    /// γ `(W)`, f32; required with `elementwise_affine`.
    pub weight: Option<wgpu::BufferSlice<'a>>,
    /// Output `(rows)`, f32.
    pub rstd: wgpu::BufferSlice<'a>,
    /// Generator state, 16 bytes (see [`crate::kernels::rng_state_bytes`]).
    pub rng: wgpu::BufferSlice<'a>,
}

/// An RMSNorm forward for one shape and configuration.
#[derive(Debug)]
pub struct RmsNormPlan {
    inner: LayerNormPlan,
    /// The LayerNorm passes also write each row's mean; RMSNorm has no use for it.
    scratch_mean: wgpu::Buffer,
}

impl RmsNormKernel {
    /// A plan for inputs of `shape` (trailing dims = `config.normalized_shape`), with the
    /// device's default geometry.
    pub fn plan(&self, device: &wgpu::Device, shape: &[usize], config: &RmsNormConfig) -> Result<RmsNormPlan> {
        self.plan_with(device, shape, config, &LayerNormPlanOptions::default())
    }

    /// [`Self::plan`] with LayerNorm's geometry overrides (lanes per row; the row-per-subgroup
    /// passes do not exist for RMSNorm, so `subgroup_rows: Some(true)` is refused).
    pub fn plan_with(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &RmsNormConfig,
        options: &LayerNormPlanOptions,
    ) -> Result<RmsNormPlan> {
        self.plan_fused(device, shape, config, None, options)
    }

    /// A plan for the pre-norm residual block `h = residual + dropout(x)`, `y = RMSNorm(h)`
    /// (`dropout`: the fused dropout's configuration), encoded with
    /// [`RmsNormPlan::encode_residual`]. The mask is the unfused `Dropout`'s for the same state.
    pub fn plan_residual(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &RmsNormConfig,
        dropout: DropoutConfig,
        options: &LayerNormPlanOptions,
    ) -> Result<RmsNormPlan> {
        self.plan_fused(device, shape, config, Some(dropout), options)
    }

    fn plan_fused(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &RmsNormConfig,
        residual_dropout: Option<DropoutConfig>,
        options: &LayerNormPlanOptions,
    ) -> Result<RmsNormPlan> {
        config.validate()?;
        let fusion = residual_dropout.map_or(LayerNormFusion::None, LayerNormFusion::ResidualDropout);
        let inner = self
            .0
            .plan_with(device, shape, &config.as_layer_norm(), fusion, options)
            .map_err(|e| rename(e, OP))?;
        let scratch_mean = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("rms_norm row means (unused)"),
            size: inner.rows().max(1) * 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(RmsNormPlan { inner, scratch_mean })
    }

    /// How this kernel's activations (x, y) are stored.
    pub fn storage(&self) -> Storage {
        self.0.storage()
    }
}

impl RmsNormPlan {
    /// Records the forward into `encoder`. Checks everything first: on error nothing is
    /// recorded.
    pub fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        b: &RmsNormBuffers<'_>,
    ) -> Result<()> {
        let buffers = LayerNormBuffers {
            x: b.x,
            y: b.y,
            weight: b.weight,
            bias: None,
            mean: self.scratch_mean.slice(..),
            rstd: b.rstd,
            rng: None,
            residual: None,
            h: None,
        };
        self.inner
            .encode(device, encoder, false, &buffers)
            .map_err(|e| rename(e, OP))
    }

    /// Records the residual block (a plan from [`RmsNormKernel::plan_residual`]): writes
    /// `h = residual + x·m` and `y = RMSNorm(h)`; `training` selects the dropout's mode. Does not
    /// advance the generator state in `b.rng`.
    pub fn encode_residual(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        training: bool,
        b: &RmsNormResidualBuffers<'_>,
    ) -> Result<()> {
        if !self.is_residual() {
            // The plain passes would ignore residual, h and rng and leave h unwritten.
            return Err(Error::invalid(OP, "encode_residual needs a plan from plan_residual"));
        }
        let buffers = LayerNormBuffers {
            x: b.x,
            y: b.y,
            weight: b.weight,
            bias: None,
            mean: self.scratch_mean.slice(..),
            rstd: b.rstd,
            rng: Some(b.rng),
            residual: Some(b.residual),
            h: Some(b.h),
        };
        self.inner
            .encode(device, encoder, training, &buffers)
            .map_err(|e| rename(e, OP))
    }

    /// Whether the plan is the residual block's.
    pub fn is_residual(&self) -> bool {
        matches!(self.inner.fusion(), LayerNormFusion::ResidualDropout(_))
    }

    /// The input shape.
    pub fn shape(&self) -> &[usize] {
        self.inner.shape()
    }

    /// Rows (product of the leading dims).
    pub fn rows(&self) -> u64 {
        self.inner.rows()
    }

    /// Row width W.
    pub fn width(&self) -> u64 {
        self.inner.width()
    }

    /// How the activations are stored.
    pub fn storage(&self) -> Storage {
        self.inner.storage()
    }

    /// Binding ranges each call dispatches: 1 unless the tensor exceeds one storage binding.
    pub fn ranges(&self) -> usize {
        self.inner.ranges()
    }
}

/// Compiled RMSNorm backward pipelines for one device and activation storage.
#[derive(Clone, Debug)]
pub struct RmsNormBackwardKernel(LayerNormBackwardKernel);

impl Kernel for RmsNormBackwardKernel {
    fn build(device: &wgpu::Device, storage: Storage) -> Self {
        Self(LayerNormBackwardKernel::build_with(device, storage, true))
    }
}

/// The buffers of one RMSNorm backward.
#[derive(Clone, Debug)]
pub struct RmsNormBackwardBuffers<'a> {
    /// The forward's input.
    pub x: wgpu::BufferSlice<'a>,
    /// Upstream gradient, same shape.
    pub dy: wgpu::BufferSlice<'a>,
    /// Output `dL/dx`, same shape.
    pub dx: wgpu::BufferSlice<'a>,
    /// γ `(W)`, f32; required with `elementwise_affine`.
    pub weight: Option<wgpu::BufferSlice<'a>>,
    /// The forward's `rstd` `(rows)`.
    pub rstd: wgpu::BufferSlice<'a>,
    /// Output `dL/dγ` `(W)`, f32; required with `elementwise_affine`.
    pub dweight: Option<wgpu::BufferSlice<'a>>,
}

/// The buffers of the residual block's backward.
#[derive(Clone, Debug)]
pub struct RmsNormResidualBackwardBuffers<'a> {
    /// The `h` the forward wrote (what was normalized).
    pub h: wgpu::BufferSlice<'a>,
    /// Upstream gradient of `y`.
    pub dy: wgpu::BufferSlice<'a>,
    /// Output `dL/dx` (the branch's gradient: `dh·m`).
    pub dx: wgpu::BufferSlice<'a>,
    /// Output `dL/dresidual` (= `dh`).
    pub dresidual: wgpu::BufferSlice<'a>,
    /// The gradient reaching `h` from its other uses, added to `dh`, if any.
    pub dh_in: Option<wgpu::BufferSlice<'a>>,
    /// γ `(W)`; required with `elementwise_affine`.
    pub weight: Option<wgpu::BufferSlice<'a>>,
    /// The forward's `rstd`.
    pub rstd: wgpu::BufferSlice<'a>,
    /// Output `dL/dγ`; required with `elementwise_affine`.
    pub dweight: Option<wgpu::BufferSlice<'a>>,
    /// The forward's generator state.
    pub rng: wgpu::BufferSlice<'a>,
}

/// An RMSNorm backward for one shape and configuration.
#[derive(Debug)]
pub struct RmsNormBackwardPlan(LayerNormBackwardPlan);

impl RmsNormBackwardKernel {
    /// A backward plan for the forward of `shape` and `config`.
    pub fn plan(&self, device: &wgpu::Device, shape: &[usize], config: &RmsNormConfig) -> Result<RmsNormBackwardPlan> {
        self.plan_with(device, shape, config, &LayerNormPlanOptions::default())
    }

    /// [`Self::plan`] with LayerNorm's geometry overrides for the dx pass.
    pub fn plan_with(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &RmsNormConfig,
        options: &LayerNormPlanOptions,
    ) -> Result<RmsNormBackwardPlan> {
        config.validate()?;
        self.0
            .plan_with(
                device,
                shape,
                &config.as_layer_norm(),
                LayerNormFusion::None,
                true,
                options,
            )
            .map(RmsNormBackwardPlan)
            .map_err(|e| rename(e, OP_BACKWARD))
    }

    /// The residual block's backward (see [`RmsNormKernel::plan_residual`]); `dropout_training`
    /// is the mode the forward's dropout ran in.
    pub fn plan_residual(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &RmsNormConfig,
        dropout: DropoutConfig,
        dropout_training: bool,
        options: &LayerNormPlanOptions,
    ) -> Result<RmsNormBackwardPlan> {
        config.validate()?;
        self.0
            .plan_with(
                device,
                shape,
                &config.as_layer_norm(),
                LayerNormFusion::ResidualDropout(dropout),
                dropout_training,
                options,
            )
            .map(RmsNormBackwardPlan)
            .map_err(|e| rename(e, OP_BACKWARD))
    }

    /// How this kernel's activations (x, dy, dx) are stored.
    pub fn storage(&self) -> Storage {
        self.0.storage()
    }
}

impl RmsNormBackwardPlan {
    /// Records the backward; with `accumulate.dx` / `accumulate.params`, adds to dx / dγ.
    /// Checks everything first: on error nothing is recorded.
    pub fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        accumulate: Accumulate,
        b: &RmsNormBackwardBuffers<'_>,
    ) -> Result<()> {
        let buffers = LayerNormBackwardBuffers {
            x: b.x,
            dy: b.dy,
            dx: b.dx,
            weight: b.weight,
            rstd: b.rstd,
            dweight: b.dweight,
            dbias: None,
            rng: None,
            dh_in: None,
            dresidual: None,
        };
        self.0
            .encode(device, encoder, accumulate, &buffers)
            .map_err(|e| rename(e, OP_BACKWARD))
    }

    /// Records the residual block's backward: `dh = RMSNorm_backward(dy) + dh_in`,
    /// `dresidual = dh`, `dx = dh·m` (the forward's mask, regenerated from `b.rng`).
    pub fn encode_residual(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        accumulate: Accumulate,
        b: &RmsNormResidualBackwardBuffers<'_>,
    ) -> Result<()> {
        if self.residual_dropout_training().is_none() {
            // The plain passes would ignore rng, dh_in and dresidual and leave dresidual unwritten.
            return Err(Error::invalid(
                OP_BACKWARD,
                "encode_residual needs a plan from RmsNormBackwardKernel::plan_residual",
            ));
        }
        let buffers = LayerNormBackwardBuffers {
            x: b.h,
            dy: b.dy,
            dx: b.dx,
            weight: b.weight,
            rstd: b.rstd,
            dweight: b.dweight,
            dbias: None,
            rng: Some(b.rng),
            dh_in: b.dh_in,
            dresidual: Some(b.dresidual),
        };
        self.0
            .encode(device, encoder, accumulate, &buffers)
            .map_err(|e| rename(e, OP_BACKWARD))
    }

    /// The input shape.
    pub fn shape(&self) -> &[usize] {
        self.0.shape()
    }

    /// The residual block's dropout mode, when the plan is the block's.
    pub fn residual_dropout_training(&self) -> Option<bool> {
        matches!(self.0.fusion(), LayerNormFusion::ResidualDropout(_)).then(|| self.0.dropout_training())
    }

    /// Binding ranges each call dispatches.
    pub fn ranges(&self) -> usize {
        self.0.ranges()
    }

    /// How the activations are stored.
    pub fn storage(&self) -> Storage {
        self.0.storage()
    }
}
