//! [`LayerNorm`]: PyTorch's `nn.LayerNorm` as a module owning γ and β on the GPU.

use std::sync::Arc;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::kernels::layer_norm::{LayerNormBuffers, LayerNormConfig, LayerNormFusion, LayerNormKernel, LayerNormPlan};
use crate::nn::dropout::Generator;
use crate::tensor::{DType, Tensor};

const OP: &str = "LayerNorm";

/// What the last forward saved for backward.
#[derive(Clone, Debug)]
pub struct LayerNormSaved {
    /// Input shape of that forward.
    pub shape: Vec<usize>,
    /// Row means, shape = the leading (un-normalized) dims.
    pub mean: Tensor,
    /// Row `1/sqrt(var + eps)`, same shape as `mean`.
    pub rstd: Tensor,
}

/// LayerNorm over the trailing `normalized_shape` dims with PyTorch semantics (biased
/// variance; `elementwise_affine` and `bias` options). Identical in train and eval.
#[derive(Debug)]
pub struct LayerNorm {
    ctx: Context,
    config: LayerNormConfig,
    kernel: Arc<LayerNormKernel>,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    plan: Option<LayerNormPlan>,
    saved: Option<LayerNormSaved>,
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
        let w = config.width();
        let weight = if config.has_weight() {
            Some(Tensor::from_slice(ctx, &vec![1.0f32; w], &shape)?)
        } else {
            None
        };
        let bias = if config.has_bias() {
            Some(Tensor::zeros(ctx, &shape, DType::F32)?)
        } else {
            None
        };
        Ok(Self {
            ctx: ctx.clone(),
            kernel: ctx.kernel::<LayerNormKernel>()?,
            config,
            weight,
            bias,
            plan: None,
            saved: None,
        })
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

    /// Normalizes `x` of shape `(*, normalized_shape)`; returns `y` of the same shape.
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
        for (what, t) in [("x", Some(x)), ("residual", residual)] {
            if let Some(t) = t.filter(|t| t.dtype() != DType::F32) {
                return Err(Error::DType {
                    op: OP,
                    what,
                    got: t.dtype(),
                    expected: DType::F32,
                });
            }
        }
        if let Some(r) = residual.filter(|r| r.shape() != x.shape()) {
            return Err(Error::shape(
                OP,
                "residual",
                r.shape(),
                format!("the shape of x, {:?}", x.shape()),
            ));
        }
        if self
            .plan
            .as_ref()
            .is_none_or(|p| p.shape() != x.shape() || p.fusion() != fusion)
        {
            self.plan = Some(self.kernel.plan(self.ctx.device(), x.shape(), &self.config, fusion)?);
        }
        let plan = self.plan.as_ref().expect("set above");
        let lead = &x.shape()[..x.shape().len() - self.config.normalized_shape.len()];
        let y = Tensor::zeros(&self.ctx, x.shape(), DType::F32)?;
        let mean = Tensor::zeros(&self.ctx, lead, DType::F32)?;
        let rstd = Tensor::zeros(&self.ctx, lead, DType::F32)?;
        let h = match residual {
            Some(_) => Some(Tensor::zeros(&self.ctx, x.shape(), DType::F32)?),
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
            None => {
                self.ctx.scoped(|| self.ctx.queue().submit([encoder.finish()]))?;
            }
        }
        self.saved = Some(LayerNormSaved {
            shape: x.shape().to_vec(),
            mean,
            rstd,
        });
        Ok((y, h))
    }
}
