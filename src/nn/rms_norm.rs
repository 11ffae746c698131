//! [`RmsNorm`]: PyTorch's `nn.RMSNorm` over the trailing `normalized_shape` dims, forward and
//! backward, on [`crate::RmsNormKernel`].

use crate::context::Context;
use crate::error::{Error, Result};
use crate::grad::{Accumulate, GradTargets, Grads};
use crate::kernels::dropout::DropoutConfig;
use crate::kernels::layer_norm::LayerNormPlanOptions;
use crate::kernels::norm_configs::RmsNormConfig;
use crate::kernels::rms_norm::{
    RmsNormBackwardBuffers, RmsNormBackwardKernel, RmsNormBackwardPlan, RmsNormBuffers, RmsNormKernel, RmsNormPlan,
    RmsNormResidualBackwardBuffers, RmsNormResidualBuffers,
};
use crate::nn::dropout::{check_target, Generator};
use crate::tensor::{DType, Tensor};

const OP: &str = "RMSNorm";
const BACKWARD: &str = "RMSNorm backward";

/// What the last forward saved for backward.
#[derive(Clone, Debug)]
pub struct RmsNormSaved {
    /// Input shape of that forward.
    pub shape: Vec<usize>,
    /// The input itself (the same buffer). Backward reads it; it must not change in between.
    pub input: Tensor,
    /// Row `1/sqrt(mean(x²) + eps)`, shape = the leading (un-normalized) dims.
    pub rstd: Tensor,
    /// For the residual block (input = the `h` it wrote): its dropout, the `(seed, offset)` it
    /// drew from and its mode.
    pub residual: Option<(DropoutConfig, u64, u64, bool)>,
}

/// RMSNorm with PyTorch semantics: `y = x·rsqrt(mean(x²) + eps)·γ` over the trailing
/// `normalized_shape` dims (`eps = None`: 2^-23, PyTorch's default). Identical in train and
/// eval. γ is f32 of shape `normalized_shape`, starting at ones; activations f32 or f16.
#[derive(Debug)]
pub struct RmsNorm {
    ctx: Context,
    config: RmsNormConfig,
    weight: Option<Tensor>,
    plan: Option<RmsNormPlan>,
    backward_plan: Option<RmsNormBackwardPlan>,
    saved: Option<RmsNormSaved>,
    options: LayerNormPlanOptions,
}

impl RmsNorm {
    /// PyTorch's defaults for `normalized_shape`: `eps = None`, γ = 1.
    pub fn new(ctx: &Context, normalized_shape: &[usize]) -> Result<Self> {
        Self::with_config(ctx, RmsNormConfig::new(normalized_shape))
    }

    /// A module with an explicit configuration (validated here).
    pub fn with_config(ctx: &Context, config: RmsNormConfig) -> Result<Self> {
        config.validate()?;
        let weight = if config.elementwise_affine {
            Some(Tensor::full(ctx, &config.normalized_shape, 1.0, DType::F32)?)
        } else {
            None
        };
        // Compile the f32 kernels now, so that a device that cannot run them fails here.
        ctx.kernel::<RmsNormKernel>()?;
        ctx.kernel::<RmsNormBackwardKernel>()?;
        Ok(Self {
            ctx: ctx.clone(),
            config,
            weight,
            plan: None,
            backward_plan: None,
            saved: None,
            options: LayerNormPlanOptions::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RmsNormConfig {
        &self.config
    }

    /// γ, when `elementwise_affine`.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// Sets γ (W = ∏ normalized_shape values). Errors, changing nothing, on a length mismatch or
    /// when there is no γ.
    pub fn set_weight(&mut self, values: &[f32]) -> Result<()> {
        let t = self.weight.as_ref().ok_or_else(|| Error::State {
            op: OP,
            reason: "this configuration has no `weight` (elementwise_affine = false)".into(),
        })?;
        if values.len() != t.numel() {
            return Err(Error::shape(OP, "weight", &[values.len()], format!("{:?}", t.shape())));
        }
        t.write(&self.ctx, values)
    }

    /// What the last successful forward saved.
    pub fn saved(&self) -> Option<&RmsNormSaved> {
        self.saved.as_ref()
    }

    /// Geometry overrides for the plans (see [`crate::LayerNorm::set_plan_options`]; there are
    /// no row-per-subgroup passes for RMSNorm). **Unstable.**
    pub fn set_plan_options(&mut self, options: LayerNormPlanOptions) {
        if options != self.options {
            self.options = options;
            self.plan = None;
            self.backward_plan = None;
        }
    }

    /// Normalizes `x` of shape `(*, normalized_shape)` (f32 or f16); returns `y` of the same
    /// shape and dtype. Submits; does not wait. A failed call changes nothing.
    pub fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        Ok(self.run(x, None, true)?.0)
    }

    /// The forward, or with `residual = (residual, generator, dropout)` the residual block
    /// `h = residual + dropout(x)`, `y = RMSNorm(h)` drawing from the generator's current state
    /// (not advanced here). Returns `y` and, for the block, `h`.
    pub(crate) fn run(
        &mut self,
        x: &Tensor,
        residual: Option<(&Tensor, &Generator, DropoutConfig)>,
        training: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.ctx.check_owns(OP, "x", x)?;
        if let Some((r, _, _)) = residual {
            self.ctx.check_owns(OP, "residual", r)?;
            if r.dtype() != x.dtype() {
                return Err(Error::DType {
                    op: OP,
                    what: "residual",
                    got: r.dtype(),
                    expected: x.dtype(),
                });
            }
            if r.shape() != x.shape() {
                return Err(Error::shape(
                    OP,
                    "residual",
                    r.shape(),
                    format!("the shape of x, {:?}", x.shape()),
                ));
            }
        }
        let storage = self.ctx.storage(x.dtype());
        let dropout = residual.map(|(_, _, d)| d);
        let fresh =
            if self.plan.as_ref().is_none_or(|p| {
                p.shape() != x.shape() || p.storage() != storage || p.is_residual() != dropout.is_some()
            }) {
                let kernel = self.ctx.kernel_with::<RmsNormKernel>(storage)?;
                let device = self.ctx.device();
                Some(match dropout {
                    None => kernel.plan_with(device, x.shape(), &self.config, &self.options)?,
                    Some(d) => kernel.plan_residual(device, x.shape(), &self.config, d, &self.options)?,
                })
            } else {
                None
            };
        let plan = fresh.as_ref().or(self.plan.as_ref()).expect("built above");
        let lead = &x.shape()[..x.shape().len() - self.config.normalized_shape.len()];
        let y = Tensor::zeros(&self.ctx, x.shape(), x.dtype())?;
        let rstd = Tensor::zeros(&self.ctx, lead, DType::F32)?;
        let device = self.ctx.device();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(OP) });
        let weight = self.weight.as_ref().map(Tensor::slice);
        let h = match residual {
            None => {
                let buffers = RmsNormBuffers {
                    x: x.slice(),
                    y: y.slice(),
                    weight,
                    rstd: rstd.slice(),
                };
                self.ctx.scoped(|| plan.encode(device, &mut encoder, &buffers))??;
                self.ctx.submit(encoder)?;
                None
            }
            Some((r, generator, _)) => {
                let h = Tensor::zeros(&self.ctx, x.shape(), x.dtype())?;
                let buffers = RmsNormResidualBuffers {
                    x: x.slice(),
                    residual: r.slice(),
                    h: h.slice(),
                    y: y.slice(),
                    weight,
                    rstd: rstd.slice(),
                    rng: generator.buffer().slice(..),
                };
                self.ctx
                    .scoped(|| plan.encode_residual(device, &mut encoder, training, &buffers))??;
                let (seed, offset) = generator.state();
                generator.submit_with(&self.ctx, seed, offset, encoder)?;
                Some(h)
            }
        };
        if fresh.is_some() {
            self.plan = fresh;
        }
        self.saved = Some(RmsNormSaved {
            shape: x.shape().to_vec(),
            input: h.clone().unwrap_or_else(|| x.clone()),
            rstd,
            residual: residual.map(|(_, g, d)| {
                let (seed, offset) = g.state();
                (d, seed, offset, training)
            }),
        });
        Ok((y, h))
    }

    /// Backward of the last forward: `dL/dx` and, with γ, `dL/dγ` (`dbias` is `None`).
    /// Errors, changing nothing, before any forward or when `dy` does not match.
    pub fn backward(&mut self, dy: &Tensor) -> Result<Grads> {
        let saved = self.check_backward(dy)?;
        let dx = Tensor::zeros(&self.ctx, &saved.shape, saved.input.dtype())?;
        let dweight = match self.config.elementwise_affine {
            true => Some(Tensor::zeros(&self.ctx, &self.config.normalized_shape, DType::F32)?),
            false => None,
        };
        let targets = GradTargets {
            dx: &dx,
            dweight: dweight.as_ref(),
            dbias: None,
        };
        self.backward_into(dy, targets, Accumulate::default())?;
        Ok(Grads {
            dx,
            dweight,
            dbias: None,
        })
    }

    /// Backward into caller tensors; with `accumulate`, gradients are added to them.
    /// `targets.dbias` must be `None` (RMSNorm has no β).
    pub fn backward_into(&mut self, dy: &Tensor, targets: GradTargets<'_>, accumulate: Accumulate) -> Result<()> {
        let saved = self.check_backward(dy)?;
        if saved.residual.is_some() {
            return Err(Error::State {
                op: BACKWARD,
                reason: "the forward was the residual block's; call backward on the fused module".into(),
            });
        }
        let act = saved.input.dtype();
        check_target(&self.ctx, BACKWARD, "dx", targets.dx, &saved.shape, act)?;
        if let Some(dw) = targets.dweight {
            check_target(
                &self.ctx,
                BACKWARD,
                "dweight",
                dw,
                &self.config.normalized_shape,
                DType::F32,
            )?;
        }
        if targets.dbias.is_some() {
            return Err(Error::invalid(BACKWARD, "RMSNorm has no bias: `dbias` must be None"));
        }
        let storage = self.ctx.storage(act);
        let fresh = if self.backward_plan.as_ref().is_none_or(|p| {
            p.shape() != saved.shape.as_slice() || p.storage() != storage || p.residual_dropout_training().is_some()
        }) {
            Some(self.ctx.kernel_with::<RmsNormBackwardKernel>(storage)?.plan_with(
                self.ctx.device(),
                &saved.shape,
                &self.config,
                &self.options,
            )?)
        } else {
            None
        };
        let plan = fresh.as_ref().or(self.backward_plan.as_ref()).expect("built above");
        let buffers = RmsNormBackwardBuffers {
            x: saved.input.slice(),
            dy: dy.slice(),
            dx: targets.dx.slice(),
            weight: self.weight.as_ref().map(Tensor::slice),
            rstd: saved.rstd.slice(),
            dweight: targets.dweight.map(Tensor::slice),
        };
        let device = self.ctx.device();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(BACKWARD) });
        self.ctx
            .scoped(|| plan.encode(device, &mut encoder, accumulate, &buffers))??;
        self.ctx.submit(encoder)?;
        if fresh.is_some() {
            self.backward_plan = fresh;
        }
        Ok(())
    }

    /// The residual block's backward of the last forward (made by [`RmsNorm::run`] with a
    /// residual): returns `(dx, dresidual, dγ)`, with the mask regenerated in `generator`'s
    /// buffer from the forward's state.
    pub(crate) fn backward_residual(
        &mut self,
        dy: &Tensor,
        dh_in: Option<&Tensor>,
        generator: &Generator,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let saved = self.check_backward(dy)?;
        let (dropout, seed, offset, training) = saved.residual.ok_or_else(|| Error::State {
            op: BACKWARD,
            reason: "the last forward was not the residual block's".into(),
        })?;
        let act = saved.input.dtype();
        if let Some(d) = dh_in {
            check_target(&self.ctx, BACKWARD, "dh_in", d, &saved.shape, act)?;
        }
        let storage = self.ctx.storage(act);
        let fresh = if self.backward_plan.as_ref().is_none_or(|p| {
            p.shape() != saved.shape.as_slice()
                || p.storage() != storage
                || p.residual_dropout_training() != Some(training)
        }) {
            Some(self.ctx.kernel_with::<RmsNormBackwardKernel>(storage)?.plan_residual(
                self.ctx.device(),
                &saved.shape,
                &self.config,
                dropout,
                training,
                &self.options,
            )?)
        } else {
            None
        };
        let plan = fresh.as_ref().or(self.backward_plan.as_ref()).expect("built above");
        let dx = Tensor::zeros(&self.ctx, &saved.shape, act)?;
        let dresidual = Tensor::zeros(&self.ctx, &saved.shape, act)?;
        let dweight = match self.config.elementwise_affine {
            true => Some(Tensor::zeros(&self.ctx, &self.config.normalized_shape, DType::F32)?),
            false => None,
        };
        let buffers = RmsNormResidualBackwardBuffers {
            h: saved.input.slice(),
            dy: dy.slice(),
            dx: dx.slice(),
            dresidual: dresidual.slice(),
            dh_in: dh_in.map(Tensor::slice),
            weight: self.weight.as_ref().map(Tensor::slice),
            rstd: saved.rstd.slice(),
            dweight: dweight.as_ref().map(Tensor::slice),
            rng: generator.buffer().slice(..),
        };
        let device = self.ctx.device();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(BACKWARD) });
        self.ctx
            .scoped(|| plan.encode_residual(device, &mut encoder, Accumulate::default(), &buffers))??;
        generator.submit_with(&self.ctx, seed, offset, encoder)?;
        if fresh.is_some() {
            self.backward_plan = fresh;
        }
        Ok((dx, dresidual, dweight))
    }

    fn check_backward(&self, dy: &Tensor) -> Result<RmsNormSaved> {
        let saved = self.saved.clone().ok_or_else(|| Error::State {
            op: BACKWARD,
            reason: "backward before any forward".into(),
        })?;
        check_target(&self.ctx, BACKWARD, "dy", dy, &saved.shape, saved.input.dtype())?;
        Ok(saved)
    }
}
