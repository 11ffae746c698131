//! [`Dropout`] and [`Dropout2d`]: reproducible dropout modules with a framework-style generator.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::kernels::dropout::{
    rng_state_bytes, DropoutBuffers, DropoutConfig, DropoutKernel, DropoutPlan, DropoutUnit, RNG_STATE_BYTES,
};
use crate::tensor::{DType, Tensor};

const FORWARD: &str = "Dropout";
const BACKWARD: &str = "Dropout backward";

/// A packed keep mask on the GPU: unit `u` is bit `u % 32` of word `u / 32`, LSB first.
/// Units are elements for dropout and `(n, c)` channels for Dropout2d.
#[derive(Clone, Debug)]
pub struct Mask {
    buffer: wgpu::Buffer,
    units: u64,
    /// The id of the context that made it.
    owner: u64,
}

impl Mask {
    pub(crate) fn alloc(ctx: &Context, units: u64) -> Result<Self> {
        let words = units.div_ceil(32).max(1);
        let buffer = ctx.create_buffer(
            "dropout mask",
            words * 4,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        )?;
        Ok(Self {
            buffer,
            units,
            owner: ctx.id(),
        })
    }

    /// [`Error::WrongDevice`] for argument `mask` of `op` unless `ctx` (or a clone) made it.
    fn check_owner(&self, ctx: &Context, op: &'static str) -> Result<()> {
        if self.owner == ctx.id() {
            Ok(())
        } else {
            Err(Error::WrongDevice {
                op,
                what: "mask",
                detail: String::new(),
            })
        }
    }

    /// The buffer of `⌈units / 32⌉` u32 words.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Number of units (bits that matter).
    pub fn units(&self) -> u64 {
        self.units
    }

    /// Downloads the packed words.
    pub async fn to_words(&self, ctx: &Context) -> Result<Vec<u32>> {
        self.check_owner(ctx, "mask read")?;
        let bytes = ctx.read_buffer(&self.buffer, 0, self.units.div_ceil(32) * 4).await?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }

    /// Downloads the mask as one bool per unit (`true` = kept).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn to_bools_blocking(&self, ctx: &Context) -> Result<Vec<bool>> {
        let words = pollster::block_on(self.to_words(ctx))?;
        Ok((0..self.units as usize)
            .map(|u| (words[u / 32] >> (u % 32)) & 1 == 1)
            .collect())
    }
}

/// A framework-style generator: `(seed, offset)` on the host, mirrored into the 16-byte state
/// buffer the kernels read right before each submission that uses it.
#[derive(Debug)]
pub(crate) struct Generator {
    seed: u64,
    offset: u64,
    buffer: wgpu::Buffer,
}

impl Generator {
    pub(crate) fn new(ctx: &Context, seed: u64) -> Result<Self> {
        let buffer = ctx.create_buffer(
            "rng state",
            RNG_STATE_BYTES,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        )?;
        Ok(Self {
            seed,
            offset: 0,
            buffer,
        })
    }

    pub(crate) fn state(&self) -> (u64, u64) {
        (self.seed, self.offset)
    }

    pub(crate) fn set(&mut self, seed: u64, offset: u64) {
        self.seed = seed;
        self.offset = offset;
    }

    pub(crate) fn advance(&mut self) {
        self.offset = self.offset.wrapping_add(1);
    }

    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Writes `(seed, offset)` into the state buffer and submits `encoder` (the write lands
    /// before the command buffer runs).
    pub(crate) fn submit_with(
        &self,
        ctx: &Context,
        seed: u64,
        offset: u64,
        encoder: wgpu::CommandEncoder,
    ) -> Result<()> {
        ctx.scoped(|| {
            ctx.queue()
                .write_buffer(&self.buffer, 0, &rng_state_bytes(seed, offset));
            ctx.queue().submit([encoder.finish()]);
        })
    }
}

/// The generator state and mode one dropout call used, kept for backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutCall {
    /// Seed of the call.
    pub seed: u64,
    /// Offset of the call.
    pub offset: u64,
    /// Whether it ran in training mode.
    pub training: bool,
}

/// Dropout with drop probability `p` and a reproducible mask (see [`crate::rng`]).
///
/// The generator is `(seed, offset)`: every training-mode call uses the current state and then
/// advances `offset` by one, like a framework generator; eval calls use no randomness and do
/// not advance. [`Dropout::forward_with_state`] uses an explicit state instead.
///
/// In eval mode with [`DropoutMode::Inverted`](crate::kernels::dropout::DropoutMode) the
/// output is the input itself (the same buffer), as in PyTorch.
#[derive(Debug)]
pub struct Dropout {
    ctx: Context,
    config: DropoutConfig,
    unit: DropoutUnit,
    training: bool,
    generator: Generator,
    plan: Option<DropoutPlan>,
    last: Option<DropoutCall>,
    /// Input shape and dtype of the last successful call.
    last_shape: Vec<usize>,
    last_dtype: DType,
}

impl Dropout {
    /// Inverted dropout with probability `p`, seed 0.
    pub fn new(ctx: &Context, p: f64) -> Result<Self> {
        Self::with_config(ctx, DropoutConfig::new(p), 0)
    }

    /// Dropout with an explicit configuration and seed (offset 0).
    pub fn with_config(ctx: &Context, config: DropoutConfig, seed: u64) -> Result<Self> {
        Self::build(ctx, config, seed, DropoutUnit::Element)
    }

    fn build(ctx: &Context, config: DropoutConfig, seed: u64, unit: DropoutUnit) -> Result<Self> {
        config.validate()?;
        // Compile the f32 kernel now, so that a device that cannot run it fails here.
        ctx.kernel::<DropoutKernel>()?;
        Ok(Self {
            ctx: ctx.clone(),
            config,
            unit,
            training: true,
            generator: Generator::new(ctx, seed)?,
            plan: None,
            last: None,
            last_shape: Vec::new(),
            last_dtype: DType::F32,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DropoutConfig {
        &self.config
    }

    /// Training mode (masks drawn, offset advances).
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Eval mode (no randomness).
    pub fn eval(&mut self) {
        self.training = false;
    }

    /// Whether the module is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// The generator state the next training call will use.
    pub fn state(&self) -> (u64, u64) {
        self.generator.state()
    }

    /// Sets the generator state.
    pub fn set_state(&mut self, seed: u64, offset: u64) {
        self.generator.set(seed, offset);
    }

    /// The state and mode of the last successful call.
    pub fn last_call(&self) -> Option<DropoutCall> {
        self.last
    }

    /// Applies dropout to `x` (f32 or f16, any shape; `(N, C, *)` for Dropout2d). The output
    /// has `x`'s dtype.
    pub fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        let (seed, offset) = self.generator.state();
        Ok(self.run(x, seed, offset, false, true)?.0)
    }

    /// Like [`Dropout::forward`], also returning the packed keep mask.
    pub fn forward_with_mask(&mut self, x: &Tensor) -> Result<(Tensor, Mask)> {
        let (seed, offset) = self.generator.state();
        let (y, mask) = self.run(x, seed, offset, true, true)?;
        Ok((y, mask.expect("requested")))
    }

    /// Applies dropout with an explicit generator state; the module's own state is untouched.
    pub fn forward_with_state(&mut self, x: &Tensor, seed: u64, offset: u64) -> Result<Tensor> {
        Ok(self.run(x, seed, offset, false, false)?.0)
    }

    fn run(
        &mut self,
        x: &Tensor,
        seed: u64,
        offset: u64,
        want_mask: bool,
        advance: bool,
    ) -> Result<(Tensor, Option<Mask>)> {
        self.ctx.check_owns(FORWARD, "x", x)?;
        let storage = self.ctx.storage(x.dtype());
        // A new plan replaces the module's only once the call has succeeded: backward uses the
        // plan of the last successful forward.
        let fresh = if self
            .plan
            .as_ref()
            .is_none_or(|p| p.shape() != x.shape() || p.storage() != storage)
        {
            Some(self.ctx.kernel_with::<DropoutKernel>(storage)?.plan(
                self.ctx.device(),
                x.shape(),
                &self.config,
                self.unit,
            )?)
        } else {
            None
        };
        let plan = fresh.as_ref().or(self.plan.as_ref()).expect("built above");
        let training = self.training;
        let identity = !training && self.config.scale(false) == 1.0;
        let (y, mask) = if identity && !want_mask {
            (x.clone(), None)
        } else {
            let y = Tensor::zeros(&self.ctx, x.shape(), x.dtype())?;
            let mask = if want_mask {
                Some(Mask::alloc(&self.ctx, plan.units())?)
            } else {
                None
            };
            let device = self.ctx.device();
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("Dropout") });
            let rng = self.generator.buffer().slice(..);
            self.ctx.scoped(|| -> Result<()> {
                plan.encode(
                    device,
                    &mut encoder,
                    training,
                    &DropoutBuffers {
                        x: x.slice(),
                        y: y.slice(),
                        rng,
                    },
                )?;
                if let Some(m) = &mask {
                    plan.encode_mask(device, &mut encoder, training, &rng, &m.buffer.slice(..))?;
                }
                Ok(())
            })??;
            self.generator.submit_with(&self.ctx, seed, offset, encoder)?;
            (y, mask)
        };
        if fresh.is_some() {
            self.plan = fresh;
        }
        self.last = Some(DropoutCall { seed, offset, training });
        self.last_shape = x.shape().to_vec();
        self.last_dtype = x.dtype();
        if training && advance {
            self.generator.advance();
        }
        Ok((y, mask))
    }
}

impl Dropout {
    /// Backward of the last call: `dx = dy·m` with the mask regenerated from that call's
    /// `(seed, offset)` (no mask is stored). In eval mode with inverted scaling it is the
    /// identity and returns `dy` itself.
    pub fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        let last = self.check_backward(dy)?;
        if !last.training && self.config.scale(false) == 1.0 {
            return Ok(dy.clone());
        }
        let dx = Tensor::zeros(&self.ctx, dy.shape(), dy.dtype())?;
        self.backward_into(dy, &dx, false)?;
        Ok(dx)
    }

    /// Backward into `dx`; with `accumulate`, `dx += dy·m`.
    pub fn backward_into(&mut self, dy: &Tensor, dx: &Tensor, accumulate: bool) -> Result<()> {
        let last = self.check_backward(dy)?;
        check_target(&self.ctx, BACKWARD, "dx", dx, dy.shape(), dy.dtype())?;
        let plan = self.plan.as_ref().expect("a forward built the plan");
        let device = self.ctx.device();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("Dropout backward"),
        });
        let b = DropoutBuffers {
            x: dy.slice(),
            y: dx.slice(),
            rng: self.generator.buffer().slice(..),
        };
        self.ctx
            .scoped(|| plan.encode_backward(device, &mut encoder, last.training, accumulate, &b))??;
        self.generator.submit_with(&self.ctx, last.seed, last.offset, encoder)
    }

    /// Backward from a packed mask kept from [`Dropout::forward_with_mask`]: `dx = dy·m`.
    pub fn backward_from_mask(&mut self, dy: &Tensor, mask: &Mask) -> Result<Tensor> {
        let last = self.check_backward(dy)?;
        let plan = self.plan.as_ref().expect("a forward built the plan");
        mask.check_owner(&self.ctx, BACKWARD)?;
        if mask.units() != plan.units() {
            return Err(Error::shape(
                BACKWARD,
                "mask",
                &[mask.units() as usize],
                format!("{} units for the forward's shape", plan.units()),
            ));
        }
        let dx = Tensor::zeros(&self.ctx, dy.shape(), dy.dtype())?;
        let device = self.ctx.device();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("Dropout backward"),
        });
        self.ctx.scoped(|| {
            plan.encode_backward_from_mask(
                device,
                &mut encoder,
                last.training,
                false,
                &dy.slice(),
                &dx.slice(),
                &mask.buffer().slice(..),
            )
        })??;
        self.ctx.submit(encoder)?;
        Ok(dx)
    }

    fn check_backward(&self, dy: &Tensor) -> Result<DropoutCall> {
        const OP: &str = BACKWARD;
        let last = self.last.ok_or_else(|| Error::State {
            op: OP,
            reason: "backward before any forward".into(),
        })?;
        if last.training != self.training {
            return Err(Error::State {
                op: OP,
                reason: "the module's mode changed since the forward; backward must use the forward's mode".into(),
            });
        }
        check_target(&self.ctx, OP, "dy", dy, &self.last_shape, self.last_dtype)?;
        Ok(last)
    }
}

/// Checks that tensor argument `what` of `op` belongs to `ctx` and has `shape` and `dtype`.
pub(crate) fn check_target(
    ctx: &Context,
    op: &'static str,
    what: &'static str,
    t: &Tensor,
    shape: &[usize],
    dtype: DType,
) -> Result<()> {
    ctx.check_owns(op, what, t)?;
    if t.dtype() != dtype {
        return Err(Error::DType {
            op,
            what,
            got: t.dtype(),
            expected: dtype,
        });
    }
    if t.shape() != shape {
        return Err(Error::shape(op, what, t.shape(), format!("{shape:?}")));
    }
    Ok(())
}

/// Dropout2d: drops whole `(n, c)` channels of an `(N, C, *)` input with probability `p`.
/// Channel `n·C + c` is the mask unit. Same generator and API as [`Dropout`] (via `Deref`).
#[derive(Debug)]
pub struct Dropout2d(Dropout);

impl Dropout2d {
    /// Inverted Dropout2d with probability `p`, seed 0.
    pub fn new(ctx: &Context, p: f64) -> Result<Self> {
        Self::with_config(ctx, DropoutConfig::new(p), 0)
    }

    /// Dropout2d with an explicit configuration and seed.
    pub fn with_config(ctx: &Context, config: DropoutConfig, seed: u64) -> Result<Self> {
        Ok(Self(Dropout::build(ctx, config, seed, DropoutUnit::Channel)?))
    }
}

impl std::ops::Deref for Dropout2d {
    type Target = Dropout;
    fn deref(&self) -> &Dropout {
        &self.0
    }
}

impl std::ops::DerefMut for Dropout2d {
    fn deref_mut(&mut self) -> &mut Dropout {
        &mut self.0
    }
}
