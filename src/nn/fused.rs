//! Fused norm+dropout modules: each normalizes and drops in a single pass over memory, with the
//! same mask the unfused [`Dropout`](crate::Dropout) would draw from the same `(seed, offset)`.
//!
//! | module                      | computes                                        | passes   |
//! |-----------------------------|-------------------------------------------------|----------|
//! | [`BatchNormDropout`]        | `dropout(BatchNorm(x))`                         | 3 (vs 5) |
//! | [`LayerNormDropout`]        | `dropout(LayerNorm(x))`                         | 2 (vs 4) |
//! | [`ResidualDropoutLayerNorm`]| `h = residual + dropout(x)`, `y = LayerNorm(h)` | 4 (vs 6) |
//! | [`ResidualDropoutRmsNorm`]  | `h = residual + dropout(x)`, `y = RMSNorm(h)`   | 4 (vs 6) |
//!
//! Each owns a generator like [`Dropout`](crate::Dropout): a training call uses the current
//! `(seed, offset)` and advances the offset by one; eval calls draw nothing.

use std::sync::Arc;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::grad::{Accumulate, GradTargets, Grads, ResidualGrads};
use crate::kernels::batch_norm::BatchNormConfig;
use crate::kernels::dropout::{DropoutConfig, DropoutKernel, DropoutUnit};
use crate::kernels::layer_norm::{LayerNormConfig, LayerNormFusion};
use crate::kernels::norm_configs::RmsNormConfig;
use crate::nn::dropout::{DropoutCall, Generator, Mask};
use crate::nn::{BatchNorm, LayerNorm, RmsNorm};
use crate::tensor::Tensor;

/// The dropout half of a fused module: configuration, generator, last call.
#[derive(Debug)]
struct DropoutPart {
    ctx: Context,
    config: DropoutConfig,
    generator: Generator,
    kernel: Arc<DropoutKernel>,
    last: Option<DropoutCall>,
}

impl DropoutPart {
    fn new(ctx: &Context, config: DropoutConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            ctx: ctx.clone(),
            config,
            generator: Generator::new(ctx, seed)?,
            kernel: ctx.kernel::<DropoutKernel>()?,
            last: None,
        })
    }

    /// Records a successful call and advances the generator after a training call.
    fn finish(&mut self, training: bool) {
        let (seed, offset) = self.generator.state();
        self.last = Some(DropoutCall { seed, offset, training });
        if training {
            self.generator.advance();
        }
    }

    /// Backward must run in the mode of the forward it differentiates.
    fn check_mode(&self, training: bool) -> Result<()> {
        match self.last {
            None => Err(Error::State {
                op: "fused backward",
                reason: "backward before any forward".into(),
            }),
            Some(c) if c.training != training => Err(Error::State {
                op: "fused backward",
                reason: "the module's mode changed since the forward; backward must use the forward's mode".into(),
            }),
            Some(_) => Ok(()),
        }
    }

    /// The packed mask of the call about to be made (current state), for `shape`.
    fn mask(&self, shape: &[usize], training: bool) -> Result<Mask> {
        let device = self.ctx.device();
        let plan = self.kernel.plan(device, shape, &self.config, DropoutUnit::Element)?;
        let mask = Mask::alloc(&self.ctx, plan.units())?;
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("fused dropout mask"),
        });
        let rng = self.generator.buffer().slice(..);
        self.ctx
            .scoped(|| plan.encode_mask(device, &mut encoder, training, &rng, &mask.buffer().slice(..)))??;
        let (seed, offset) = self.generator.state();
        self.generator.submit_with(&self.ctx, seed, offset, encoder)?;
        Ok(mask)
    }
}

macro_rules! generator_api {
    () => {
        /// The dropout configuration.
        pub fn dropout_config(&self) -> &DropoutConfig {
            &self.drop.config
        }

        /// The generator state the next training call will use.
        pub fn state(&self) -> (u64, u64) {
            self.drop.generator.state()
        }

        /// Sets the generator state.
        pub fn set_state(&mut self, seed: u64, offset: u64) {
            self.drop.generator.set(seed, offset);
        }

        /// The generator state and mode of the last successful call.
        pub fn last_call(&self) -> Option<DropoutCall> {
            self.drop.last
        }
    };
}

/// `y = dropout(BatchNorm(x))`: the statistics pass, then one pass that normalizes and drops.
/// The BatchNorm part behaves exactly like [`BatchNorm`] (running statistics, train/eval);
/// the dropout follows the BatchNorm's mode.
#[derive(Debug)]
pub struct BatchNormDropout {
    bn: BatchNorm,
    drop: DropoutPart,
}

impl BatchNormDropout {
    /// A fused module from a BatchNorm configuration, a dropout configuration and a seed.
    pub fn new(ctx: &Context, bn: BatchNormConfig, dropout: DropoutConfig, seed: u64) -> Result<Self> {
        Ok(Self {
            bn: BatchNorm::with_config(ctx, bn)?,
            drop: DropoutPart::new(ctx, dropout, seed)?,
        })
    }

    /// The BatchNorm part (parameters, running statistics, saved statistics).
    pub fn batch_norm(&self) -> &BatchNorm {
        &self.bn
    }

    /// The BatchNorm part, mutably (to set parameters or the mode).
    pub fn batch_norm_mut(&mut self) -> &mut BatchNorm {
        &mut self.bn
    }

    /// Training mode for both halves.
    pub fn train(&mut self) {
        self.bn.train();
    }

    /// Eval mode for both halves.
    pub fn eval(&mut self) {
        self.bn.eval();
    }

    generator_api!();

    /// Applies the fused op to `x` of shape `(N, C, *)`.
    pub fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        let y = self
            .bn
            .forward_impl(x, Some((self.drop.config, &self.drop.generator)))?;
        self.drop.finish(self.bn.is_training());
        Ok(y)
    }

    /// Like [`BatchNormDropout::forward`], also returning the packed element mask.
    pub fn forward_with_mask(&mut self, x: &Tensor) -> Result<(Tensor, Mask)> {
        let mask = self.drop.mask(x.shape(), self.bn.is_training())?;
        Ok((self.forward(x)?, mask))
    }

    /// Backward of the last forward: the dropout's mask (regenerated from that call's seed and
    /// offset) is applied to `dy` inside BatchNorm's backward passes.
    pub fn backward(&mut self, dy: &Tensor) -> Result<Grads> {
        self.bn.backward_with(dy, Some(&self.drop.generator))
    }

    /// Backward into caller tensors (`dx` of the input's shape and dtype; `dweight`, `dbias` of
    /// `(C)`, f32, required when affine); with `accumulate` set, gradients are added to them,
    /// as [`BatchNorm::backward_into`]. Errors, changing nothing, as [`BatchNormDropout::backward`]
    /// does and when a target does not match.
    pub fn backward_into(&mut self, dy: &Tensor, targets: GradTargets<'_>, accumulate: Accumulate) -> Result<()> {
        self.bn
            .backward_impl(dy, targets, accumulate, Some(&self.drop.generator))
    }
}

/// `y = dropout(LayerNorm(x))` in one pass: the row is read once, normalized and dropped.
#[derive(Debug)]
pub struct LayerNormDropout {
    ln: LayerNorm,
    drop: DropoutPart,
    training: bool,
}

impl LayerNormDropout {
    /// A fused module from a LayerNorm configuration, a dropout configuration and a seed.
    pub fn new(ctx: &Context, ln: LayerNormConfig, dropout: DropoutConfig, seed: u64) -> Result<Self> {
        Ok(Self {
            ln: LayerNorm::with_config(ctx, ln)?,
            drop: DropoutPart::new(ctx, dropout, seed)?,
            training: true,
        })
    }

    /// The LayerNorm part (parameters, saved statistics).
    pub fn layer_norm(&self) -> &LayerNorm {
        &self.ln
    }

    /// The LayerNorm part, mutably.
    pub fn layer_norm_mut(&mut self) -> &mut LayerNorm {
        &mut self.ln
    }

    /// Training mode (dropout active).
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Eval mode (dropout inactive or scaling by `1 − p`).
    pub fn eval(&mut self) {
        self.training = false;
    }

    generator_api!();

    /// Applies the fused op to `x` of shape `(*, normalized_shape)`.
    pub fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        let fusion = LayerNormFusion::Dropout(self.drop.config);
        let (y, _) = self
            .ln
            .run(x, fusion, None, Some(&self.drop.generator), self.training)?;
        self.drop.finish(self.training);
        Ok(y)
    }

    /// Like [`LayerNormDropout::forward`], also returning the packed element mask.
    pub fn forward_with_mask(&mut self, x: &Tensor) -> Result<(Tensor, Mask)> {
        let mask = self.drop.mask(x.shape(), self.training)?;
        Ok((self.forward(x)?, mask))
    }

    /// Backward of the last forward: `dy` times the regenerated mask, through LayerNorm's
    /// backward, in the same passes.
    pub fn backward(&mut self, dy: &Tensor) -> Result<Grads> {
        self.drop.check_mode(self.training)?;
        Ok(self.ln.backward_with(dy, None, Some(&self.drop.generator))?.0)
    }
}

/// The pre-norm transformer residual pattern in one pass:
/// `h = residual + dropout(x)`, `y = LayerNorm(h)`, returning both `y` and `h`.
#[derive(Debug)]
pub struct ResidualDropoutLayerNorm {
    ln: LayerNorm,
    drop: DropoutPart,
    training: bool,
}

impl ResidualDropoutLayerNorm {
    /// A fused module from a LayerNorm configuration, a dropout configuration and a seed.
    pub fn new(ctx: &Context, ln: LayerNormConfig, dropout: DropoutConfig, seed: u64) -> Result<Self> {
        Ok(Self {
            ln: LayerNorm::with_config(ctx, ln)?,
            drop: DropoutPart::new(ctx, dropout, seed)?,
            training: true,
        })
    }

    /// The LayerNorm part.
    pub fn layer_norm(&self) -> &LayerNorm {
        &self.ln
    }

    /// The LayerNorm part, mutably.
    pub fn layer_norm_mut(&mut self) -> &mut LayerNorm {
        &mut self.ln
    }

    /// Training mode.
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Eval mode.
    pub fn eval(&mut self) {
        self.training = false;
    }

    generator_api!();

    /// Returns `(y, h)` with `h = residual + dropout(x)` and `y = LayerNorm(h)`. `x` and
    /// `residual` have the same shape `(*, normalized_shape)`.
    pub fn forward(&mut self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        let fusion = LayerNormFusion::ResidualDropout(self.drop.config);
        let (y, h) = self
            .ln
            .run(x, fusion, Some(residual), Some(&self.drop.generator), self.training)?;
        self.drop.finish(self.training);
        Ok((y, h.expect("residual fusion writes h")))
    }

    /// Backward of the last forward for `dy = dL/dy`, plus `dh_in`, the gradient reaching `h`
    /// from its other uses (the next residual add in a transformer), if any:
    /// `dh = LayerNorm_backward(dy) + dh_in`, `dresidual = dh`, `dx = dh·m`, in one pass.
    pub fn backward(&mut self, dy: &Tensor, dh_in: Option<&Tensor>) -> Result<ResidualGrads> {
        self.drop.check_mode(self.training)?;
        let (grads, dresidual) = self.ln.backward_with(dy, dh_in, Some(&self.drop.generator))?;
        Ok(ResidualGrads {
            dx: grads.dx,
            dresidual: dresidual.expect("the residual fusion produces dresidual"),
            dweight: grads.dweight,
            dbias: grads.dbias,
        })
    }

    /// Like [`ResidualDropoutLayerNorm::forward`], also returning the packed mask applied to `x`.
    pub fn forward_with_mask(&mut self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor, Mask)> {
        let mask = self.drop.mask(x.shape(), self.training)?;
        let (y, h) = self.forward(x, residual)?;
        Ok((y, h, mask))
    }
}

/// The pre-norm block of current language models in one pass:
/// `h = residual + dropout(x)`, `y = RMSNorm(h)`, returning both `y` and `h`.
#[derive(Debug)]
pub struct ResidualDropoutRmsNorm {
    rms: RmsNorm,
    drop: DropoutPart,
    training: bool,
}

impl ResidualDropoutRmsNorm {
    /// A fused module from an RMSNorm configuration, a dropout configuration and a seed.
    pub fn new(ctx: &Context, rms: RmsNormConfig, dropout: DropoutConfig, seed: u64) -> Result<Self> {
        Ok(Self {
            rms: RmsNorm::with_config(ctx, rms)?,
            drop: DropoutPart::new(ctx, dropout, seed)?,
            training: true,
        })
    }

    /// The RMSNorm part (γ, saved statistics).
    pub fn rms_norm(&self) -> &RmsNorm {
        &self.rms
    }

    /// The RMSNorm part, mutably.
    pub fn rms_norm_mut(&mut self) -> &mut RmsNorm {
        &mut self.rms
    }

    /// Training mode.
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Eval mode.
    pub fn eval(&mut self) {
        self.training = false;
    }

    generator_api!();

    /// Returns `(y, h)` with `h = residual + dropout(x)` and `y = RMSNorm(h)`. `x` and
    /// `residual` have the same shape `(*, normalized_shape)`.
    pub fn forward(&mut self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        let (y, h) = self.rms.run(
            x,
            Some((residual, &self.drop.generator, self.drop.config)),
            self.training,
        )?;
        self.drop.finish(self.training);
        Ok((y, h.expect("the residual block writes h")))
    }

    /// Backward of the last forward for `dy = dL/dy`, plus `dh_in`, the gradient reaching `h`
    /// from its other uses, if any: `dh = RMSNorm_backward(dy) + dh_in`, `dresidual = dh`,
    /// `dx = dh·m`, in one pass. `dbias` is `None`.
    pub fn backward(&mut self, dy: &Tensor, dh_in: Option<&Tensor>) -> Result<ResidualGrads> {
        self.drop.check_mode(self.training)?;
        let (dx, dresidual, dweight) = self.rms.backward_residual(dy, dh_in, &self.drop.generator)?;
        Ok(ResidualGrads {
            dx,
            dresidual,
            dweight,
            dbias: None,
        })
    }

    /// Like [`ResidualDropoutRmsNorm::forward`], also returning the packed mask applied to `x`.
    pub fn forward_with_mask(&mut self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor, Mask)> {
        let mask = self.drop.mask(x.shape(), self.training)?;
        let (y, h) = self.forward(x, residual)?;
        Ok((y, h, mask))
    }
}
