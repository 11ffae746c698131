//! [`GroupNorm`] and [`InstanceNorm`]: PyTorch's `nn.GroupNorm` and `nn.InstanceNorm*d`
//! (without running statistics, `G = C`), forward and backward, on
//! [`crate::GroupNormKernel`] and [`crate::GroupNormBackwardKernel`].

use crate::context::Context;
use crate::error::{Error, Result};
use crate::grad::{Accumulate, GradTargets, Grads};
use crate::kernels::group_norm::{
    GroupNormBackwardBuffers, GroupNormBackwardKernel, GroupNormBackwardPlan, GroupNormBuffers, GroupNormKernel,
    GroupNormPlan, GroupNormPlanOptions,
};
use crate::kernels::norm_configs::GroupNormConfig;
use crate::nn::dropout::check_target;
use crate::state::StateTensor;
use crate::tensor::{DType, Tensor};

const OP: &str = "GroupNorm";
const BACKWARD: &str = "GroupNorm backward";

/// What the last forward saved for backward.
#[derive(Clone, Debug)]
pub struct GroupNormSaved {
    /// Input shape of that forward.
    pub shape: Vec<usize>,
    /// The input itself (the same buffer). Backward reads it; it must not change in between.
    pub input: Tensor,
    /// Each (sample, group)'s mean, shape `(N, G)`.
    pub mean: Tensor,
    /// Each (sample, group)'s `1/sqrt(var + eps)` (biased variance), shape `(N, G)`.
    pub rstd: Tensor,
}

/// GroupNorm with PyTorch semantics on `(N, C, *)`: `G` groups of `C/G` consecutive channels,
/// statistics per (sample, group) over its channels and positions (biased variance),
/// `y = (x − mean)·rstd·γ_c + β_c`. Identical in train and eval. γ (ones) and β (zeros) are f32
/// of shape `(C)`; activations f32 or f16.
#[derive(Debug)]
pub struct GroupNorm {
    ctx: Context,
    config: GroupNormConfig,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    plan: Option<GroupNormPlan>,
    backward_plan: Option<GroupNormBackwardPlan>,
    saved: Option<GroupNormSaved>,
    options: GroupNormPlanOptions,
}

impl GroupNorm {
    /// PyTorch's defaults: `num_groups` groups of `num_channels`, eps 1e-5, affine.
    pub fn new(ctx: &Context, num_groups: usize, num_channels: usize) -> Result<Self> {
        Self::with_config(ctx, GroupNormConfig::new(num_groups, num_channels))
    }

    /// A module with an explicit configuration (validated here).
    pub fn with_config(ctx: &Context, config: GroupNormConfig) -> Result<Self> {
        config.validate()?;
        let (weight, bias) = if config.affine {
            let c = [config.num_channels];
            (
                Some(Tensor::full(ctx, &c, 1.0, DType::F32)?),
                Some(Tensor::full(ctx, &c, 0.0, DType::F32)?),
            )
        } else {
            (None, None)
        };
        // Compile the f32 kernels now, so that a device that cannot run them fails here.
        ctx.kernel::<GroupNormKernel>()?;
        ctx.kernel::<GroupNormBackwardKernel>()?;
        Ok(Self {
            ctx: ctx.clone(),
            config,
            weight,
            bias,
            plan: None,
            backward_plan: None,
            saved: None,
            options: GroupNormPlanOptions::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GroupNormConfig {
        &self.config
    }

    /// γ `(C)`, when affine.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// β `(C)`, when affine.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Sets γ (C values). Errors, changing nothing, on a length mismatch or without affine.
    pub fn set_weight(&mut self, values: &[f32]) -> Result<()> {
        self.set_param("weight", values)
    }

    /// Sets β (C values). Errors, changing nothing, on a length mismatch or without affine.
    pub fn set_bias(&mut self, values: &[f32]) -> Result<()> {
        self.set_param("bias", values)
    }

    fn set_param(&mut self, name: &'static str, values: &[f32]) -> Result<()> {
        let t = if name == "weight" { &self.weight } else { &self.bias };
        let t = t.as_ref().ok_or_else(|| Error::State {
            op: OP,
            reason: format!("this configuration has no `{name}` (affine = false)"),
        })?;
        if values.len() != self.config.num_channels {
            return Err(Error::shape(
                OP,
                name,
                &[values.len()],
                format!("{} values (num_channels)", self.config.num_channels),
            ));
        }
        t.write(&self.ctx, values)
    }

    /// What the last successful forward saved.
    pub fn saved(&self) -> Option<&GroupNormSaved> {
        self.saved.as_ref()
    }

    /// Geometry overrides for the plans (reduce split, quads per invocation). **Unstable**:
    /// for tests and benchmarks; results agree within rounding.
    pub fn set_plan_options(&mut self, options: GroupNormPlanOptions) {
        if options != self.options {
            self.options = options;
            self.plan = None;
            self.backward_plan = None;
        }
    }

    /// The state with PyTorch's key names, prefixed by `prefix`: `weight` and `bias` (with
    /// affine), each of shape `(C)`.
    pub async fn state(&self, prefix: &str) -> Result<Vec<(String, StateTensor)>> {
        let params = [("weight", self.weight.as_ref()), ("bias", self.bias.as_ref())];
        crate::state::params_state(&self.ctx, prefix, &params, &[self.config.num_channels]).await
    }

    /// Serializes [`GroupNorm::state`] to safetensors bytes.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn state_to_safetensors(&self, prefix: &str) -> Result<Vec<u8>> {
        crate::state::serialize(&pollster::block_on(self.state(prefix))?)
    }

    /// Loads state written by [`GroupNorm::state_to_safetensors`] or by PyTorch. Every key this
    /// configuration has must be present as f32 of shape `(C)`; everything is checked before
    /// anything is written.
    pub fn load_state_from_safetensors(&mut self, bytes: &[u8], prefix: &str) -> Result<()> {
        let params = [("weight", self.weight.as_ref()), ("bias", self.bias.as_ref())];
        crate::state::load_params(&self.ctx, bytes, prefix, &params, &[self.config.num_channels])
    }

    /// Normalizes `x` of shape `(N, C, *)` (f32 or f16); returns `y` of the same shape and
    /// dtype. Submits; does not wait. A failed call changes nothing.
    pub fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        self.ctx.check_owns(OP, "x", x)?;
        let storage = self.ctx.storage(x.dtype());
        let fresh = if self
            .plan
            .as_ref()
            .is_none_or(|p| p.shape() != x.shape() || p.storage() != storage)
        {
            let kernel = self.ctx.kernel_with::<GroupNormKernel>(storage)?;
            Some(kernel.plan_with(self.ctx.device(), x.shape(), &self.config, &self.options)?)
        } else {
            None
        };
        let plan = fresh.as_ref().or(self.plan.as_ref()).expect("built above");
        let groups = [x.shape()[0], self.config.num_groups];
        let y = Tensor::zeros(&self.ctx, x.shape(), x.dtype())?;
        let mean = Tensor::zeros(&self.ctx, &groups, DType::F32)?;
        let rstd = Tensor::zeros(&self.ctx, &groups, DType::F32)?;
        let buffers = GroupNormBuffers {
            x: x.slice(),
            y: y.slice(),
            weight: self.weight.as_ref().map(Tensor::slice),
            bias: self.bias.as_ref().map(Tensor::slice),
            mean: mean.slice(),
            rstd: rstd.slice(),
        };
        let device = self.ctx.device();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(OP) });
        self.ctx.scoped(|| plan.encode(device, &mut encoder, &buffers))??;
        self.ctx.submit(encoder)?;
        if fresh.is_some() {
            self.plan = fresh;
        }
        self.saved = Some(GroupNormSaved {
            shape: x.shape().to_vec(),
            input: x.clone(),
            mean,
            rstd,
        });
        Ok(y)
    }

    /// Backward of the last forward: `dL/dx` and, with affine, `dL/dγ` and `dL/dβ`. Errors,
    /// changing nothing, before any forward or when `dy` does not match.
    pub fn backward(&mut self, dy: &Tensor) -> Result<Grads> {
        let saved = self.check_backward(dy)?;
        let dx = Tensor::zeros(&self.ctx, &saved.shape, saved.input.dtype())?;
        let (dweight, dbias) = if self.config.affine {
            let c = [self.config.num_channels];
            (
                Some(Tensor::zeros(&self.ctx, &c, DType::F32)?),
                Some(Tensor::zeros(&self.ctx, &c, DType::F32)?),
            )
        } else {
            (None, None)
        };
        let targets = GradTargets {
            dx: &dx,
            dweight: dweight.as_ref(),
            dbias: dbias.as_ref(),
        };
        self.backward_into(dy, targets, Accumulate::default())?;
        Ok(Grads { dx, dweight, dbias })
    }

    /// Backward into caller tensors; with `accumulate`, gradients are added to them. With
    /// affine, `dweight` and `dbias` must both be given (`(C)`, f32); without, neither.
    pub fn backward_into(&mut self, dy: &Tensor, targets: GradTargets<'_>, accumulate: Accumulate) -> Result<()> {
        let saved = self.check_backward(dy)?;
        let act = saved.input.dtype();
        check_target(&self.ctx, BACKWARD, "dx", targets.dx, &saved.shape, act)?;
        let c = [self.config.num_channels];
        for (what, t) in [("dweight", targets.dweight), ("dbias", targets.dbias)] {
            match (t, self.config.affine) {
                (Some(t), true) => check_target(&self.ctx, BACKWARD, what, t, &c, DType::F32)?,
                (None, true) => {
                    return Err(Error::invalid(BACKWARD, format!("`{what}` is required with affine")));
                }
                (Some(_), false) => {
                    return Err(Error::invalid(
                        BACKWARD,
                        format!("`{what}` must be None without affine"),
                    ));
                }
                (None, false) => {}
            }
        }
        let storage = self.ctx.storage(act);
        let fresh = if self
            .backward_plan
            .as_ref()
            .is_none_or(|p| p.shape() != saved.shape.as_slice() || p.storage() != storage)
        {
            let kernel = self.ctx.kernel_with::<GroupNormBackwardKernel>(storage)?;
            Some(kernel.plan_with(self.ctx.device(), &saved.shape, &self.config, &self.options)?)
        } else {
            None
        };
        let plan = fresh.as_ref().or(self.backward_plan.as_ref()).expect("built above");
        let buffers = GroupNormBackwardBuffers {
            x: saved.input.slice(),
            dy: dy.slice(),
            dx: targets.dx.slice(),
            weight: self.weight.as_ref().map(Tensor::slice),
            mean: saved.mean.slice(),
            rstd: saved.rstd.slice(),
            dweight: targets.dweight.map(Tensor::slice),
            dbias: targets.dbias.map(Tensor::slice),
        };
        let device = self.ctx.device();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(BACKWARD) });
        self.ctx
            .scoped(|| plan.encode(device, &mut encoder, &buffers, accumulate))??;
        self.ctx.submit(encoder)?;
        if fresh.is_some() {
            self.backward_plan = fresh;
        }
        Ok(())
    }

    fn check_backward(&self, dy: &Tensor) -> Result<GroupNormSaved> {
        let saved = self.saved.clone().ok_or_else(|| Error::State {
            op: BACKWARD,
            reason: "backward before any forward".into(),
        })?;
        check_target(&self.ctx, BACKWARD, "dy", dy, &saved.shape, saved.input.dtype())?;
        Ok(saved)
    }
}

/// InstanceNorm without running statistics (PyTorch's `nn.InstanceNorm1d/2d/3d` with
/// `track_running_stats = False`, its default): statistics per (sample, channel) over the
/// positions, which is GroupNorm with `G = C`. Affine parameters are off by default, as in
/// PyTorch. Every [`GroupNorm`] method is available through `Deref`.
#[derive(Debug)]
pub struct InstanceNorm(GroupNorm);

impl InstanceNorm {
    /// PyTorch's defaults for `num_features` channels: eps 1e-5, no affine parameters.
    pub fn new(ctx: &Context, num_features: usize) -> Result<Self> {
        Ok(Self(GroupNorm::with_config(
            ctx,
            GroupNormConfig::instance_norm(num_features),
        )?))
    }

    /// With `affine` (γ, β per channel) and `eps` given.
    pub fn with_options(ctx: &Context, num_features: usize, eps: f32, affine: bool) -> Result<Self> {
        let config = GroupNormConfig {
            eps,
            affine,
            ..GroupNormConfig::instance_norm(num_features)
        };
        Ok(Self(GroupNorm::with_config(ctx, config)?))
    }
}

impl std::ops::Deref for InstanceNorm {
    type Target = GroupNorm;
    fn deref(&self) -> &GroupNorm {
        &self.0
    }
}

impl std::ops::DerefMut for InstanceNorm {
    fn deref_mut(&mut self) -> &mut GroupNorm {
        &mut self.0
    }
}
