//! [`BatchNorm`]: PyTorch's `nn.BatchNorm{1,2,3}d` as a module that owns its parameters and
//! running statistics on the GPU.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::grad::{Accumulate, GradTargets, Grads};
use crate::kernels::batch_norm::{
    BatchNormBuffers, BatchNormConfig, BatchNormKernel, BatchNormPlan, BatchNormPlanOptions, ReduceSplit,
};
use crate::kernels::batch_norm_backward::{BatchNormBackwardBuffers, BatchNormBackwardKernel, BatchNormBackwardPlan};
use crate::kernels::dropout::DropoutConfig;
use crate::nn::dropout::{check_target, Generator};
use crate::state::StateTensor;
use crate::tensor::{DType, Tensor};

const OP: &str = "BatchNorm";

/// What the last forward saved for backward.
#[derive(Clone, Debug)]
pub struct BatchNormSaved {
    /// Input shape of that forward.
    pub shape: Vec<usize>,
    /// The input itself (the same buffer). Backward reads it; it must not change in between.
    pub x: Tensor,
    /// Whether the module was in training mode.
    pub training: bool,
    /// Whether it normalized with batch statistics (training, or no running stats).
    pub batch_stats: bool,
    /// Mean it normalized with, `(C)`.
    pub mean: Tensor,
    /// `1/sqrt(var + eps)` it normalized with, `(C)`.
    pub invstd: Tensor,
    /// The fused dropout and the `(seed, offset)` it drew from, if any.
    pub dropout: Option<(DropoutConfig, u64, u64)>,
}

/// BatchNorm over `(N, C, *)` inputs with PyTorch semantics (see [`BatchNormConfig`]).
///
/// - Training: normalizes with the batch mean and biased batch variance over all axes but 1,
///   updates `running_mean`/`running_var` (unbiased) with `momentum` (or the cumulative average
///   when `momentum` is `None`) and increments `num_batches_tracked`.
/// - Eval: normalizes with the running statistics and changes nothing; without
///   `track_running_stats` it uses batch statistics in both modes.
///
/// Parameters and running statistics live on the GPU; the state round-trips through
/// safetensors with PyTorch's key names. A module starts in training mode, like PyTorch's.
#[derive(Debug)]
pub struct BatchNorm {
    ctx: Context,
    config: BatchNormConfig,
    backward_plan: Option<BatchNormBackwardPlan>,
    training: bool,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running_mean: Option<Tensor>,
    running_var: Option<Tensor>,
    /// u64 counter as two little-endian u32 words; the kernel increments it on the GPU.
    num_batches_tracked: Option<wgpu::Buffer>,
    plan: Option<BatchNormPlan>,
    saved: Option<BatchNormSaved>,
    /// The reduce split of forward and backward plans; `None`: the device's default.
    split: Option<ReduceSplit>,
}

impl BatchNorm {
    /// A module with PyTorch's defaults for `num_features` channels.
    pub fn new(ctx: &Context, num_features: usize) -> Result<Self> {
        Self::with_config(ctx, BatchNormConfig::new(num_features))
    }

    /// A module with an explicit configuration (validated here).
    pub fn with_config(ctx: &Context, config: BatchNormConfig) -> Result<Self> {
        config.validate()?;
        // Compile the f32 kernels now, so that a device that cannot run them fails here.
        ctx.kernel::<BatchNormKernel>()?;
        ctx.kernel::<BatchNormBackwardKernel>()?;
        let c = config.num_features;
        let (weight, bias) = if config.affine {
            (
                Some(Tensor::full(ctx, &[c], 1.0, DType::F32)?),
                Some(Tensor::zeros(ctx, &[c], DType::F32)?),
            )
        } else {
            (None, None)
        };
        let (running_mean, running_var, num_batches_tracked) = if config.track_running_stats {
            (
                Some(Tensor::zeros(ctx, &[c], DType::F32)?),
                Some(Tensor::full(ctx, &[c], 1.0, DType::F32)?),
                Some(ctx.create_buffer(
                    "num_batches_tracked",
                    8,
                    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                )?),
            )
        } else {
            (None, None, None)
        };
        Ok(Self {
            ctx: ctx.clone(),
            config,
            backward_plan: None,
            training: true,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            plan: None,
            saved: None,
            split: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// The context the module lives on.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn context(&self) -> &Context {
        &self.ctx
    }

    /// The GPU counter `num_batches_tracked` (two u32 words), when tracking.
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn num_batches_buffer(&self) -> Option<&wgpu::Buffer> {
        self.num_batches_tracked.as_ref()
    }

    /// Switches to training mode (batch statistics, running-stat updates).
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Switches to eval mode (running statistics, no updates).
    pub fn eval(&mut self) {
        self.training = false;
    }

    /// Whether the module is in training mode.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// γ, `(C)`, when affine.
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// β, `(C)`, when affine.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Running mean, `(C)`, when tracking.
    pub fn running_mean(&self) -> Option<&Tensor> {
        self.running_mean.as_ref()
    }

    /// Running unbiased variance, `(C)`, when tracking.
    pub fn running_var(&self) -> Option<&Tensor> {
        self.running_var.as_ref()
    }

    /// How the forward's statistics pass and the backward's reduce pass split each channel:
    /// `None` (the default) leaves it to [`crate::tuning::default_reduce_split`] for the device.
    /// Results agree within rounding whatever the split. **Unstable**, like everything in
    /// [`crate::tuning`]: for benchmarks and tests.
    pub fn set_reduce_split(&mut self, split: Option<ReduceSplit>) {
        if split != self.split {
            self.split = split;
            self.plan = None;
            self.backward_plan = None;
        }
    }

    /// The split set with [`BatchNorm::set_reduce_split`] (`None`: the device's default).
    pub fn reduce_split(&self) -> Option<ReduceSplit> {
        self.split
    }

    /// What the last successful forward saved for backward.
    pub fn saved(&self) -> Option<&BatchNormSaved> {
        self.saved.as_ref()
    }

    /// Reads `num_batches_tracked` back from the GPU (`None` when not tracking).
    pub async fn num_batches_tracked(&self) -> Result<Option<u64>> {
        match &self.num_batches_tracked {
            None => Ok(None),
            Some(buf) => {
                let bytes = self.ctx.read_buffer(buf, 0, 8).await?;
                Ok(Some(u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))))
            }
        }
    }

    /// Blocking [`BatchNorm::num_batches_tracked`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn num_batches_tracked_blocking(&self) -> Result<Option<u64>> {
        pollster::block_on(self.num_batches_tracked())
    }

    /// Sets γ (length C). Errors, changing nothing, when not affine or on a length mismatch.
    pub fn set_weight(&mut self, values: &[f32]) -> Result<()> {
        self.write_param("weight", values)
    }

    /// Sets β (length C).
    pub fn set_bias(&mut self, values: &[f32]) -> Result<()> {
        self.write_param("bias", values)
    }

    /// Sets the running mean (length C).
    pub fn set_running_mean(&mut self, values: &[f32]) -> Result<()> {
        self.write_param("running_mean", values)
    }

    /// Sets the running variance (length C).
    pub fn set_running_var(&mut self, values: &[f32]) -> Result<()> {
        self.write_param("running_var", values)
    }

    /// Sets `num_batches_tracked`. Errors when not tracking.
    pub fn set_num_batches_tracked(&mut self, value: u64) -> Result<()> {
        let buf = self.num_batches_tracked.as_ref().ok_or_else(|| Error::State {
            op: OP,
            reason: "num_batches_tracked exists only with track_running_stats".into(),
        })?;
        self.ctx
            .scoped(|| self.ctx.queue().write_buffer(buf, 0, &value.to_le_bytes()))
    }

    fn param(&self, name: &str) -> Option<&Tensor> {
        match name {
            "weight" => self.weight.as_ref(),
            "bias" => self.bias.as_ref(),
            "running_mean" => self.running_mean.as_ref(),
            "running_var" => self.running_var.as_ref(),
            _ => None,
        }
    }

    fn write_param(&mut self, name: &'static str, values: &[f32]) -> Result<()> {
        let c = self.config.num_features;
        let t = self.param(name).ok_or_else(|| Error::State {
            op: OP,
            reason: format!(
                "this configuration has no `{name}` (affine = {}, track_running_stats = {})",
                self.config.affine, self.config.track_running_stats
            ),
        })?;
        if values.len() != c {
            return Err(Error::shape(OP, name, &[values.len()], format!("({c})")));
        }
        t.write(&self.ctx, values)
    }

    /// Applies the module to `x` of shape `(N, C, *)` and returns `y` of the same shape.
    /// Submits the work to the queue; does not wait for it.
    ///
    /// Errors (changing neither the running statistics nor `num_batches_tracked`) for a rank
    /// below 2, a channel count other than `num_features`, a non-f32 input, empty input, a
    /// single value per channel when batch statistics are needed, or a tensor beyond the
    /// device's binding limit.
    pub fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        self.forward_impl(x, None)
    }

    /// [`BatchNorm::forward`], optionally with a dropout fused into the normalize pass that
    /// draws from `generator`'s current state (not advanced here).
    pub(crate) fn forward_impl(&mut self, x: &Tensor, dropout: Option<(DropoutConfig, &Generator)>) -> Result<Tensor> {
        self.ctx.check_owns(OP, "x", x)?;
        let fused = dropout.as_ref().map(|(d, _)| *d);
        let storage = self.ctx.storage(x.dtype());
        // A new plan replaces the module's once the call has succeeded.
        let fresh = if self
            .plan
            .as_ref()
            .is_none_or(|p| p.shape() != x.shape() || p.dropout() != fused.as_ref() || p.storage() != storage)
        {
            let options = BatchNormPlanOptions {
                dropout: fused,
                split: self.split,
                ..Default::default()
            };
            Some(self.ctx.kernel_with::<BatchNormKernel>(storage)?.plan_with(
                self.ctx.device(),
                x.shape(),
                &self.config,
                &options,
            )?)
        } else {
            None
        };
        let plan = fresh.as_ref().or(self.plan.as_ref()).expect("built above");
        let c = self.config.num_features;
        let y = Tensor::zeros(&self.ctx, x.shape(), x.dtype())?;
        let mean = Tensor::zeros(&self.ctx, &[c], DType::F32)?;
        let invstd = Tensor::zeros(&self.ctx, &[c], DType::F32)?;
        let buffers = BatchNormBuffers {
            x: x.slice(),
            y: y.slice(),
            weight: self.weight.as_ref().map(Tensor::slice),
            bias: self.bias.as_ref().map(Tensor::slice),
            running_mean: self.running_mean.as_ref().map(Tensor::slice),
            running_var: self.running_var.as_ref().map(Tensor::slice),
            num_batches_tracked: self.num_batches_tracked.as_ref().map(|b| b.slice(..)),
            save_mean: mean.slice(),
            save_invstd: invstd.slice(),
            rng: dropout.as_ref().map(|(_, g)| g.buffer().slice(..)),
        };
        let device = self.ctx.device();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("BatchNorm forward"),
        });
        self.ctx
            .scoped(|| plan.encode(device, &mut encoder, self.training, &buffers))??;
        match &dropout {
            Some((_, generator)) => {
                let (seed, offset) = generator.state();
                generator.submit_with(&self.ctx, seed, offset, encoder)?;
            }
            None => self.ctx.submit(encoder)?,
        }
        let batch_stats = plan.uses_batch_stats(self.training);
        if fresh.is_some() {
            self.plan = fresh;
        }
        self.saved = Some(BatchNormSaved {
            shape: x.shape().to_vec(),
            x: x.clone(),
            training: self.training,
            batch_stats,
            mean,
            invstd,
            dropout: dropout.as_ref().map(|(d, g)| {
                let (seed, offset) = g.state();
                (*d, seed, offset)
            }),
        });
        Ok(y)
    }

    /// Backward of the last forward: `dL/dx`, and `dL/dγ`, `dL/dβ` when affine, for the upstream
    /// gradient `dy` (f32, the forward's shape). Uses the statistics that forward saved: batch
    /// statistics (then dx flows through the mean and variance) or running statistics.
    ///
    /// Errors, changing nothing, when no forward ran, when the module's mode changed since the
    /// forward (a training-mode backward needs a training forward's batch statistics), or when
    /// `dy` does not match.
    pub fn backward(&mut self, dy: &Tensor) -> Result<Grads> {
        self.backward_with(dy, None)
    }

    /// Backward into caller tensors; with `accumulate` set, gradients are added to them, as a
    /// training loop accumulates `.grad` over several backward passes.
    pub fn backward_into(&mut self, dy: &Tensor, targets: GradTargets<'_>, accumulate: Accumulate) -> Result<()> {
        self.backward_impl(dy, targets, accumulate, None)
    }

    /// [`BatchNorm::backward`], regenerating a fused dropout's mask in `generator`'s buffer.
    pub(crate) fn backward_with(&mut self, dy: &Tensor, generator: Option<&Generator>) -> Result<Grads> {
        let saved = self.check_backward(dy)?;
        let c = self.config.num_features;
        let dx = Tensor::zeros(&self.ctx, &saved.shape, saved.x.dtype())?;
        let (dweight, dbias) = if self.config.affine {
            (
                Some(Tensor::zeros(&self.ctx, &[c], DType::F32)?),
                Some(Tensor::zeros(&self.ctx, &[c], DType::F32)?),
            )
        } else {
            (None, None)
        };
        let targets = GradTargets {
            dx: &dx,
            dweight: dweight.as_ref(),
            dbias: dbias.as_ref(),
        };
        self.backward_impl(dy, targets, Accumulate::default(), generator)?;
        Ok(Grads { dx, dweight, dbias })
    }

    fn check_backward(&self, dy: &Tensor) -> Result<BatchNormSaved> {
        let saved = self.saved.clone().ok_or_else(|| Error::State {
            op: OP,
            reason: "backward before any forward".into(),
        })?;
        if saved.training != self.training {
            let (then, now) = if saved.training {
                ("training", "eval")
            } else {
                ("eval", "training")
            };
            return Err(Error::State {
                op: OP,
                reason: format!(
                    "the last forward ran in {then} mode but the module is now in {now} mode; \
                     run a forward in {now} mode first (a training backward needs batch statistics)"
                ),
            });
        }
        self.ctx.check_owns(OP, "dy", dy)?;
        if dy.dtype() != saved.x.dtype() {
            return Err(Error::DType {
                op: OP,
                what: "dy",
                got: dy.dtype(),
                expected: saved.x.dtype(),
            });
        }
        if dy.shape() != saved.shape.as_slice() {
            return Err(Error::shape(
                OP,
                "dy",
                dy.shape(),
                format!("the forward's shape {:?}", saved.shape),
            ));
        }
        Ok(saved)
    }

    pub(crate) fn backward_impl(
        &mut self,
        dy: &Tensor,
        targets: GradTargets<'_>,
        accumulate: Accumulate,
        generator: Option<&Generator>,
    ) -> Result<()> {
        let saved = self.check_backward(dy)?;
        check_target(&self.ctx, OP, "dx", targets.dx, &saved.shape, saved.x.dtype())?;
        for (what, t) in [("dweight", targets.dweight), ("dbias", targets.dbias)] {
            if let Some(t) = t {
                check_target(&self.ctx, OP, what, t, &[self.config.num_features], DType::F32)?;
            }
        }
        // The fused dropout ran in the forward's mode, which check_backward pinned to this one.
        let dropout = saved.dropout.map(|(d, _, _)| (d, saved.training));
        if dropout.is_some() && generator.is_none() {
            return Err(Error::State {
                op: OP,
                reason: "the forward fused a dropout; call backward on the fused module".into(),
            });
        }
        let storage = self.ctx.storage(saved.x.dtype());
        let fresh = if self.backward_plan.as_ref().is_none_or(|p| {
            p.shape() != saved.shape.as_slice() || p.dropout() != dropout.as_ref() || p.storage() != storage
        }) {
            Some(self.ctx.kernel_with::<BatchNormBackwardKernel>(storage)?.plan_with(
                self.ctx.device(),
                &saved.shape,
                &self.config,
                dropout,
                self.split,
            )?)
        } else {
            None
        };
        let plan = fresh.as_ref().or(self.backward_plan.as_ref()).expect("built above");
        let buffers = BatchNormBackwardBuffers {
            x: saved.x.slice(),
            dy: dy.slice(),
            dx: targets.dx.slice(),
            weight: self.weight.as_ref().map(Tensor::slice),
            save_mean: saved.mean.slice(),
            save_invstd: saved.invstd.slice(),
            dweight: targets.dweight.map(Tensor::slice),
            dbias: targets.dbias.map(Tensor::slice),
            rng: generator.map(|g| g.buffer().slice(..)),
        };
        let device = self.ctx.device();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("BatchNorm backward"),
        });
        self.ctx
            .scoped(|| plan.encode(device, &mut encoder, saved.batch_stats, accumulate, &buffers))??;
        match (generator, saved.dropout) {
            (Some(g), Some((_, seed, offset))) => g.submit_with(&self.ctx, seed, offset, encoder)?,
            _ => self.ctx.submit(encoder)?,
        }
        if fresh.is_some() {
            self.backward_plan = fresh;
        }
        Ok(())
    }

    /// The state as `(key, tensor)` entries with PyTorch's names, prefixed by `prefix` (e.g.
    /// `"bn1."`): `weight`, `bias` (affine), `running_mean`, `running_var`,
    /// `num_batches_tracked` (int64, shape `[]`) when tracking.
    pub async fn state(&self, prefix: &str) -> Result<Vec<(String, StateTensor)>> {
        let mut out = Vec::new();
        for name in ["weight", "bias", "running_mean", "running_var"] {
            if let Some(t) = self.param(name) {
                let v: Vec<f32> = t.to_vec(&self.ctx).await?;
                out.push((
                    format!("{prefix}{name}"),
                    StateTensor::F32 {
                        shape: vec![v.len()],
                        data: v,
                    },
                ));
            }
        }
        if let Some(n) = self.num_batches_tracked().await? {
            out.push((
                format!("{prefix}num_batches_tracked"),
                StateTensor::I64 {
                    shape: vec![],
                    data: vec![n as i64],
                },
            ));
        }
        Ok(out)
    }

    /// Serializes [`BatchNorm::state`] to safetensors bytes.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn state_to_safetensors(&self, prefix: &str) -> Result<Vec<u8>> {
        let state = pollster::block_on(self.state(prefix))?;
        crate::state::serialize(&state)
    }

    /// Loads state written by [`BatchNorm::state_to_safetensors`] or by PyTorch
    /// (`safetensors.torch.save_file(module.state_dict())`). Every key this configuration has
    /// must be present, f32 of shape `(C)` (int64 scalar or `[1]` for `num_batches_tracked`).
    /// Everything is checked before anything is written.
    pub fn load_state_from_safetensors(&mut self, bytes: &[u8], prefix: &str) -> Result<()> {
        let c = self.config.num_features;
        let tensors = crate::state::deserialize(bytes)?;
        let mut pending: Vec<(&'static str, Vec<f32>)> = Vec::new();
        for name in ["weight", "bias", "running_mean", "running_var"] {
            if self.param(name).is_none() {
                continue;
            }
            let key = format!("{prefix}{name}");
            let t = tensors
                .get(&key)
                .ok_or_else(|| Error::SafeTensors(format!("missing key `{key}`")))?;
            let data = t.as_f32(&key, &[c])?;
            pending.push((name, data));
        }
        let mut count = None;
        if self.num_batches_tracked.is_some() {
            let key = format!("{prefix}num_batches_tracked");
            let t = tensors
                .get(&key)
                .ok_or_else(|| Error::SafeTensors(format!("missing key `{key}`")))?;
            count = Some(t.as_count(&key)?);
        }
        for (name, data) in &pending {
            self.write_param(name, data)?;
        }
        if let Some(n) = count {
            self.set_num_batches_tracked(n)?;
        }
        Ok(())
    }

    /// Writes the state to a safetensors file.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn save_state(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        crate::state::write_file(path.as_ref(), &self.state_to_safetensors("")?)
    }

    /// Loads the state from a safetensors file (see [`BatchNorm::load_state_from_safetensors`]).
    pub fn load_state(&mut self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let bytes = crate::state::read_file(path.as_ref())?;
        self.load_state_from_safetensors(&bytes, "")
    }
}
