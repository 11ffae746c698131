//! [`LayerNorm`]: PyTorch's `nn.LayerNorm` as a module owning γ and β on the GPU.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::grad::{Accumulate, GradTargets, Grads};
use crate::kernels::layer_norm::{
    LayerNormBuffers, LayerNormConfig, LayerNormFusion, LayerNormKernel, LayerNormPlan, LayerNormPlanOptions,
};
use crate::kernels::layer_norm_backward::{LayerNormBackwardBuffers, LayerNormBackwardKernel, LayerNormBackwardPlan};
use crate::nn::dropout::{check_target, Generator};
use crate::state::StateTensor;
use crate::tensor::{DType, Tensor};

const OP: &str = "LayerNorm";
const BACKWARD: &str = "LayerNorm backward";

/// What the last forward saved for backward.
#[derive(Clone, Debug)]
pub struct LayerNormSaved {
    /// Input shape of that forward.
    pub shape: Vec<usize>,
    /// What was normalized: the input `x`, or `h` for the residual block (the same buffer the
    /// forward read or wrote). Backward reads it; it must not change in between.
    pub input: Tensor,
    /// Row means, shape = the leading (un-normalized) dims.
    pub mean: Tensor,
    /// Row `1/sqrt(var + eps)`, same shape as `mean`.
    pub rstd: Tensor,
    /// The fusion of that forward.
    pub fusion: LayerNormFusion,
    /// The `(seed, offset)` its dropout drew from, and whether it ran in training mode.
    pub dropout_state: Option<(u64, u64, bool)>,
}

/// LayerNorm over the trailing `normalized_shape` dims with PyTorch semantics (biased
/// variance; `elementwise_affine` and `bias` options). Identical in train and eval.
#[derive(Debug)]
pub struct LayerNorm {
    ctx: Context,
    config: LayerNormConfig,
    backward_plan: Option<LayerNormBackwardPlan>,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    plan: Option<LayerNormPlan>,
    saved: Option<LayerNormSaved>,
    /// Geometry overrides of forward and backward plans (default: the device's choice).
    options: LayerNormPlanOptions,
}

impl LayerNorm {
    /// PyTorch's defaults: eps 1e-5, γ = 1 and β = 0 of shape `normalized_shape`.
    pub fn new(ctx: &Context, normalized_shape: &[usize]) -> Result<Self> {
        Self::with_config(ctx, LayerNormConfig::new(normalized_shape))
    }

    /// A module with an explicit configuration (validated here).
    pub fn with_config(ctx: &Context, config: LayerNormConfig) -> Result<Self> {
        config.validate()?;
        let shape = config.normalized_shape.clone();
        let weight = if config.has_weight() {
            Some(Tensor::full(ctx, &shape, 1.0, DType::F32)?)
        } else {
            None
        };
        let bias = if config.has_bias() {
            Some(Tensor::zeros(ctx, &shape, DType::F32)?)
        } else {
            None
        };
        // Compile the f32 kernels now, so that a device that cannot run them fails here.
        ctx.kernel::<LayerNormKernel>()?;
        ctx.kernel::<LayerNormBackwardKernel>()?;
        Ok(Self {
            ctx: ctx.clone(),
            backward_plan: None,
            config,
            weight,
            bias,
            plan: None,
            saved: None,
            options: LayerNormPlanOptions::default(),
        })
    }

    /// Geometry overrides for the forward and backward plans (lanes per row, the row-per-subgroup
    /// passes); the default leaves the choice to the device. Results agree within rounding
    /// whatever the geometry. **Unstable**, like everything in [`crate::tuning`]: for
    /// benchmarks, tests and `normdrop selftest`. A choice the device cannot run makes the next
    /// call fail with [`Error::Unsupported`] (nothing changes).
    pub fn set_plan_options(&mut self, options: LayerNormPlanOptions) {
        if options != self.options {
            self.options = options;
            self.plan = None;
            self.backward_plan = None;
        }
    }

    /// The geometry overrides in use (see [`LayerNorm::set_plan_options`]).
    pub fn plan_options(&self) -> LayerNormPlanOptions {
        self.options
    }

    /// The configuration.
    pub fn config(&self) -> &LayerNormConfig {
        &self.config
    }

    /// γ, when `elementwise_affine`.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// β, when `elementwise_affine && bias`.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// What the last successful forward saved.
    pub fn saved(&self) -> Option<&LayerNormSaved> {
        self.saved.as_ref()
    }

    /// Sets γ (W = ∏ normalized_shape values). Errors, changing nothing, on a length mismatch
    /// or when there is no γ.
    pub fn set_weight(&mut self, values: &[f32]) -> Result<()> {
        Self::write(&self.ctx, "weight", self.weight.as_ref(), self.config.width(), values)
    }

    /// Sets β.
    pub fn set_bias(&mut self, values: &[f32]) -> Result<()> {
        Self::write(&self.ctx, "bias", self.bias.as_ref(), self.config.width(), values)
    }

    fn write(ctx: &Context, name: &'static str, t: Option<&Tensor>, width: usize, values: &[f32]) -> Result<()> {
        let t = t.ok_or_else(|| Error::State {
            op: OP,
            reason: format!("this configuration has no `{name}`"),
        })?;
        if values.len() != width {
            return Err(Error::shape(
                OP,
                name,
                &[values.len()],
                format!("{width} values (normalized_shape)"),
            ));
        }
        t.write(ctx, values)
    }

    /// The state with PyTorch's key names, prefixed by `prefix`: `weight` (with γ) and `bias`
    /// (with β), each of shape `normalized_shape`.
    pub async fn state(&self, prefix: &str) -> Result<Vec<(String, StateTensor)>> {
        let params = [("weight", self.weight.as_ref()), ("bias", self.bias.as_ref())];
        crate::state::params_state(&self.ctx, prefix, &params, &self.config.normalized_shape).await
    }

    /// Serializes [`LayerNorm::state`] to safetensors bytes.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn state_to_safetensors(&self, prefix: &str) -> Result<Vec<u8>> {
        crate::state::serialize(&pollster::block_on(self.state(prefix))?)
    }

    /// Loads state written by [`LayerNorm::state_to_safetensors`] or by PyTorch. Every key this
    /// configuration has must be present as f32 of shape `normalized_shape`; everything is
    /// checked before anything is written.
    pub fn load_state_from_safetensors(&mut self, bytes: &[u8], prefix: &str) -> Result<()> {
        let params = [("weight", self.weight.as_ref()), ("bias", self.bias.as_ref())];
        crate::state::load_params(&self.ctx, bytes, prefix, &params, &self.config.normalized_shape)
    }

    /// Writes the state to a safetensors file.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn save_state(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        crate::state::write_file(path.as_ref(), &self.state_to_safetensors("")?)
    }

    /// Loads the state from a safetensors file.
    pub fn load_state(&mut self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let bytes = crate::state::read_file(path.as_ref())?;
        self.load_state_from_safetensors(&bytes, "")
    }

    /// Normalizes `x` of shape `(*, normalized_shape)` (f32 or f16); returns `y` of the same
    /// shape and dtype. γ and β stay f32 and the statistics are computed in f32.
    pub fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        Ok(self.run(x, LayerNormFusion::None, None, None, true)?.0)
    }

    /// The shared forward of LayerNorm and its fused variants: returns `y` and, for the
    /// residual fusion, `h`. `generator` is required with dropout fusion (not advanced here).
    pub(crate) fn run(
        &mut self,
        x: &Tensor,
        fusion: LayerNormFusion,
        residual: Option<&Tensor>,
        generator: Option<&Generator>,
        training: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.ctx.check_owns(OP, "x", x)?;
        if let Some(r) = residual {
            self.ctx.check_owns(OP, "residual", r)?;
        }
        if let Some(r) = residual.filter(|r| r.dtype() != x.dtype()) {
            return Err(Error::DType {
                op: OP,
                what: "residual",
                got: r.dtype(),
                expected: x.dtype(),
            });
        }
        if let Some(r) = residual.filter(|r| r.shape() != x.shape()) {
            return Err(Error::shape(
                OP,
                "residual",
                r.shape(),
                format!("the shape of x, {:?}", x.shape()),
            ));
        }
        let storage = self.ctx.storage(x.dtype());
        let fresh = if self
            .plan
            .as_ref()
            .is_none_or(|p| p.shape() != x.shape() || p.fusion() != fusion || p.storage() != storage)
        {
            Some(self.ctx.kernel_with::<LayerNormKernel>(storage)?.plan_with(
                self.ctx.device(),
                x.shape(),
                &self.config,
                fusion,
                &self.options,
            )?)
        } else {
            None
        };
        let plan = fresh.as_ref().or(self.plan.as_ref()).expect("built above");
        let lead = &x.shape()[..x.shape().len() - self.config.normalized_shape.len()];
        let y = Tensor::zeros(&self.ctx, x.shape(), x.dtype())?;
        let mean = Tensor::zeros(&self.ctx, lead, DType::F32)?;
        let rstd = Tensor::zeros(&self.ctx, lead, DType::F32)?;
        let h = match residual {
            Some(_) => Some(Tensor::zeros(&self.ctx, x.shape(), x.dtype())?),
            None => None,
        };
        let buffers = LayerNormBuffers {
            x: x.slice(),
            y: y.slice(),
            weight: self.weight.as_ref().map(Tensor::slice),
            bias: self.bias.as_ref().map(Tensor::slice),
            mean: mean.slice(),
            rstd: rstd.slice(),
            rng: generator.map(|g| g.buffer().slice(..)),
            residual: residual.map(Tensor::slice),
            h: h.as_ref().map(Tensor::slice),
        };
        let device = self.ctx.device();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("LayerNorm"),
        });
        self.ctx
            .scoped(|| plan.encode(device, &mut encoder, training, &buffers))??;
        match generator {
            Some(g) => {
                let (seed, offset) = g.state();
                g.submit_with(&self.ctx, seed, offset, encoder)?;
            }
            None => self.ctx.submit(encoder)?,
        }
        if fresh.is_some() {
            self.plan = fresh;
        }
        self.saved = Some(LayerNormSaved {
            shape: x.shape().to_vec(),
            input: h.clone().unwrap_or_else(|| x.clone()),
            mean,
            rstd,
            fusion,
            dropout_state: generator.map(|g| {
                let (seed, offset) = g.state();
                (seed, offset, training)
            }),
        });
        Ok((y, h))
    }

    /// Backward of the last forward: `dL/dx`, `dL/dγ`, `dL/dβ` for the upstream gradient `dy`.
    /// Errors, changing nothing, before any forward or when `dy` does not match.
    pub fn backward(&mut self, dy: &Tensor) -> Result<Grads> {
        Ok(self.backward_with(dy, None, None)?.0)
    }

    /// Backward into caller tensors; with `accumulate`, gradients are added to them.
    pub fn backward_into(&mut self, dy: &Tensor, targets: GradTargets<'_>, accumulate: Accumulate) -> Result<()> {
        self.backward_impl(dy, targets, None, None, accumulate, None)
    }

    /// Backward with fresh gradient tensors; for the residual block also returns dresidual.
    pub(crate) fn backward_with(
        &mut self,
        dy: &Tensor,
        dh_in: Option<&Tensor>,
        generator: Option<&Generator>,
    ) -> Result<(Grads, Option<Tensor>)> {
        let saved = self.check_backward(dy)?;
        let zeros = |shape: &[usize]| Tensor::zeros(&self.ctx, shape, DType::F32);
        let act = saved.input.dtype();
        let dx = Tensor::zeros(&self.ctx, &saved.shape, act)?;
        let norm = self.config.normalized_shape.clone();
        let dweight = if self.config.has_weight() {
            Some(zeros(&norm)?)
        } else {
            None
        };
        let dbias = if self.config.has_bias() {
            Some(zeros(&norm)?)
        } else {
            None
        };
        let dresidual = match saved.fusion {
            LayerNormFusion::ResidualDropout(_) => Some(Tensor::zeros(&self.ctx, &saved.shape, act)?),
            _ => None,
        };
        let targets = GradTargets {
            dx: &dx,
            dweight: dweight.as_ref(),
            dbias: dbias.as_ref(),
        };
        self.backward_impl(dy, targets, dresidual.as_ref(), dh_in, Accumulate::default(), generator)?;
        Ok((Grads { dx, dweight, dbias }, dresidual))
    }

    fn check_backward(&self, dy: &Tensor) -> Result<LayerNormSaved> {
        let saved = self.saved.clone().ok_or_else(|| Error::State {
            op: OP,
            reason: "backward before any forward".into(),
        })?;
        check_target(&self.ctx, BACKWARD, "dy", dy, &saved.shape, saved.input.dtype())?;
        Ok(saved)
    }

    pub(crate) fn backward_impl(
        &mut self,
        dy: &Tensor,
        targets: GradTargets<'_>,
        dresidual: Option<&Tensor>,
        dh_in: Option<&Tensor>,
        accumulate: Accumulate,
        generator: Option<&Generator>,
    ) -> Result<()> {
        let saved = self.check_backward(dy)?;
        let act = saved.input.dtype();
        check_target(&self.ctx, BACKWARD, "dx", targets.dx, &saved.shape, act)?;
        for (what, t) in [("dresidual", dresidual), ("dh_in", dh_in)] {
            if let Some(t) = t {
                check_target(&self.ctx, BACKWARD, what, t, &saved.shape, act)?;
            }
        }
        for (what, t) in [("dweight", targets.dweight), ("dbias", targets.dbias)] {
            if let Some(t) = t {
                check_target(&self.ctx, BACKWARD, what, t, &self.config.normalized_shape, DType::F32)?;
            }
        }
        let state = match (saved.fusion, saved.dropout_state, generator) {
            (LayerNormFusion::None, _, _) => None,
            (_, Some((seed, offset, training)), Some(g)) => Some((g, seed, offset, training)),
            _ => {
                return Err(Error::State {
                    op: OP,
                    reason: "the forward fused a dropout; call backward on the fused module".into(),
                })
            }
        };
        let dropout_training = state.is_none_or(|(_, _, _, training)| training);
        let fusion = saved.fusion;
        let storage = self.ctx.storage(act);
        let fresh = if self.backward_plan.as_ref().is_none_or(|p| {
            p.shape() != saved.shape.as_slice()
                || p.fusion() != fusion
                || p.dropout_training() != dropout_training
                || p.storage() != storage
        }) {
            Some(self.ctx.kernel_with::<LayerNormBackwardKernel>(storage)?.plan_with(
                self.ctx.device(),
                &saved.shape,
                &self.config,
                fusion,
                dropout_training,
                &self.options,
            )?)
        } else {
            None
        };
        let plan = fresh.as_ref().or(self.backward_plan.as_ref()).expect("built above");
        let buffers = LayerNormBackwardBuffers {
            x: saved.input.slice(),
            dy: dy.slice(),
            dx: targets.dx.slice(),
            weight: self.weight.as_ref().map(Tensor::slice),
            rstd: saved.rstd.slice(),
            dweight: targets.dweight.map(Tensor::slice),
            dbias: targets.dbias.map(Tensor::slice),
            rng: state.map(|(g, ..)| g.buffer().slice(..)),
            dh_in: dh_in.map(Tensor::slice),
            dresidual: dresidual.map(Tensor::slice),
        };
        let device = self.ctx.device();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("LayerNorm backward"),
        });
        self.ctx
            .scoped(|| plan.encode(device, &mut encoder, accumulate, &buffers))??;
        match state {
            Some((g, seed, offset, _)) => g.submit_with(&self.ctx, seed, offset, encoder)?,
            None => self.ctx.submit(encoder)?,
        }
        if fresh.is_some() {
            self.backward_plan = fresh;
        }
        Ok(())
    }
}
