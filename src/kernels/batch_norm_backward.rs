//! BatchNorm backward, low level: [`BatchNormBackwardKernel`] and [`BatchNormBackwardPlan`],
//! encoding into a caller's encoder. See `shaders/batch_norm/backward.wgsl` for the formulas.
//!
//! | dispatch       | workgroups        | reads                         | writes                 |
//! |----------------|-------------------|-------------------------------|------------------------|
//! | `batch_norm_backward_reduce`   | C · chunks        | x, dy (+ generator: dy·mask)  | partial sums           |
//! | `batch_norm_backward_finalize` | C                 | partial sums, saved stats     | dγ, dβ, coefficients   |
//! | `batch_norm_backward_dx`       | ⌈N·C·S/(1024·run)⌉| x, dy, coefficients           | dx                     |
//!
//! Each entry point is one algorithm; its variants are pipelines specialised by WGSL override
//! flags: `DROPOUT` (dy times the fused dropout's regenerated mask), `EVAL` (running
//! statistics), `PARK` (g = dy·m parked in dx between the reduce and the dx pass) and, in
//! `batch_norm_backward_dx_aligned`, `ACCUMULATE`.
//!
//! With [`ReduceSplit::Invocation`] (the CPU-adapter default) `batch_norm_backward_reduce_serial` takes a chunk
//! per invocation (⌈C · chunks / 256⌉ workgroups) and `batch_norm_backward_finalize_serial` a channel per
//! invocation. Where S % 4 == 0 the dx pass is `batch_norm_backward_dx_aligned` (every quad in one channel),
//! which skips the per-element walk a CPU driver would otherwise execute under a lane mask for
//! every quad, and takes runs of [`default_normalize_run`] quads per invocation where S ≥ 4·run
//! (8 on CPU adapters, 1 on GPUs), reading a channel's coefficients once per run.
//!
//! Traffic: 5 passes over the activations (reduce reads x and dy; dx reads both and writes dx).
//!
//! On CPU adapters with 8-lane subgroups, a backward with batch statistics is one dispatch
//! instead (`batch_norm_backward_channel`, C workgroups of one subgroup each, see
//! [`BatchNormBackwardPlanOptions::channel_pass`]): each channel is summed, then walked again
//! for dx, while it is in the core's cache.
//!
//! Running statistics (the backward of an eval-mode forward, `batch_stats` false), where
//! dx = γ·invstd·dy needs no reduction: `batch_norm_backward_eval_coef` (a channel per invocation) writes each
//! channel's (running mean, γ·invstd), the reduce with `EVAL` writes dx while it sums, and
//! `batch_norm_backward_finalize` runs only for dγ, dβ (affine): 3 passes of traffic.
//!
//! With a fused dropout on a CPU adapter, writing f32 dx, the reduce and the dx pass take
//! `PARK`: the reduce also writes g = dy·m into dx and the dx pass reads it back, so the mask is
//! drawn once instead of twice, for one more write of the activations (a CPU driver spends more
//! on a Philox call than on a store; a GPU the reverse).

use crate::context::Kernel;
use crate::error::{Error, Result};
use crate::grad::Accumulate;
use crate::kernels::batch_norm::{
    channel_choice, default_normalize_run, finalize_groups, reduce_groups, runs_align, sample_ranges, serial_finalize,
    BatchNormConfig, BatchNormPath, BnDims, ReduceSplit, SampleRange,
};
use crate::kernels::dropout::{DropParams, DropoutConfig, RNG_STATE_BYTES};
use crate::kernels::{
    bind_group, binding, binding_at, binding_or, check_device, fold_workgroups, placeholder, uniform_buffer,
    vec4_bindable, vec4_module, BindLimits, BindRange, CallArgs, Dispatch, FastDiv, Pipelines, Storage,
};

const OP: &str = "batch_norm backward";
const WORKGROUP: u64 = 256;

/// Geometry overrides for a BatchNorm backward plan ([`BatchNormBackwardKernel::plan_with_options`]).
/// `Default` leaves every choice to the device's policy; results agree within rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchNormBackwardPlanOptions {
    /// How the reduce pass splits each channel (`None`: [`crate::tuning::default_reduce_split`]).
    pub split: Option<ReduceSplit>,
    /// With batch statistics, one dispatch instead of three: a workgroup of one 8-lane subgroup
    /// per channel sums it, writes dγ and dβ, and writes dx
    /// (`shaders/cpu/batch_norm/backward_channel.wgsl`). Possible on CPU adapters with `SUBGROUP`
    /// of at least 8 lanes, for f32 tensors within one storage binding bound as 16-byte vectors
    /// and S % 4 == 0. `None`: where possible, when `split` is `None` and there are at least two
    /// channels per host thread; `Some(false)`: never; `Some(true)`: wherever possible, or the
    /// plan fails with [`Error::Unsupported`].
    pub channel_pass: Option<bool>,
}

/// Entry points in `shaders/batch_norm/backward.wgsl` that get a pipeline: one per algorithm,
/// each specialised by the override flags `DROPOUT`, `EVAL`, `PARK` and `ACCUMULATE`.
pub(crate) const ENTRY_POINTS: &[&str] = &[
    "batch_norm_backward_reduce",
    "batch_norm_backward_finalize",
    "batch_norm_backward_eval_coef",
    "batch_norm_backward_dx",
    "batch_norm_backward_dx_aligned",
    "batch_norm_backward_export",
    "batch_norm_backward_finalize_imported",
];

const FLAG_AFFINE: u32 = 1;
const FLAG_BATCH_STATS: u32 = 2;
pub(crate) const FLAG_ACCUM_DX: u32 = 4;
const FLAG_ACCUM_PARAMS: u32 = 8;

/// Mirrors `struct Params` in `shaders/batch_norm/backward.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct BnBackwardParams {
    pub(crate) n: u32,
    pub(crate) c: u32,
    pub(crate) s: u32,
    pub(crate) m: u32,
    pub(crate) chunk_len: u32,
    pub(crate) chunks: u32,
    pub(crate) flags: u32,
    pub(crate) total: u32,
    pub(crate) drop_threshold: u32,
    pub(crate) drop_flags: u32,
    pub(crate) drop_scale: f32,
    pub(crate) part_base: u32,
    pub(crate) parts: u32,
    pub(crate) m_all: u32,
    pub(crate) elem_base: u32,
    pub(crate) first: u32,
    pub(crate) div_s: [u32; 2],
    pub(crate) div_c: [u32; 2],
    pub(crate) run: u32,
    /// Index in `coef` of the dispatch's channel 0 (GroupNorm's ranges; 0 here).
    pub(crate) chan_base: u32,
    /// Channels per `save_mean` entry without batch statistics (GroupNorm's C/G; 1 here).
    pub(crate) group_chans: u32,
    pub(crate) _pad: u32,
}
const _: () = assert!(std::mem::size_of::<BnBackwardParams>() == 96);

/// Compiled BatchNorm backward pipelines for one device and activation storage.
#[derive(Clone, Debug)]
pub struct BatchNormBackwardKernel {
    device: wgpu::Device,
    storage: Storage,
    /// Every entry point of `batch_norm/backward.wgsl` with the flag combinations a plan can
    /// take (see [`BatchNormBackwardKernel::build_pipelines`]).
    pipelines: Pipelines,
    /// The reduce and dx passes from the vec4 variant (f32 only), for ranges whose x, dy and dx
    /// bind as whole 16-byte vectors (the reduce also needs S % 4 == 0).
    pipelines_vec4: Option<Pipelines>,
    /// Stand-ins for γ (read), dγ, dβ (written) and the generator state when unused.
    placeholders: [wgpu::Buffer; 4],
    /// The one-pass-per-channel backward (`batch_norm_backward_channel`, vec4 variant, by `DROPOUT` and
    /// `ACCUMULATE`): built on CPU adapters with `SUBGROUP` of at least 8 lanes and f32 storage.
    channel: Option<Pipelines>,
}

/// The reduce's and the dx pass's flags, in the order their `wanted` predicates see them.
pub(crate) const REDUCE_FLAGS: [&str; 3] = ["DROPOUT", "EVAL", "PARK"];

/// The reduce's flag combinations a plan takes: parking only with a dropout, with batch
/// statistics.
pub(crate) fn reduce_wanted(f: &[bool]) -> bool {
    !f[2] || (f[0] && !f[1])
}
pub(crate) const DX_FLAGS: [&str; 2] = ["DROPOUT", "PARK"];
pub(crate) const DX_ALIGNED_FLAGS: [&str; 3] = ["DROPOUT", "PARK", "ACCUMULATE"];

impl BatchNormBackwardKernel {
    /// The reduce and dx pipelines of `module` (the `vec4` variant or not; parking only with a
    /// dropout, in the batch-statistics reduce, and in the dx pass that writes) and, beside
    /// them, the one-invocation-per-chunk reduce (CPU adapters' default split, built everywhere:
    /// a plan may ask for either split); outside the vec4 variant also the whole-call passes
    /// (`finalize`, `eval_coef`).
    fn build_pipelines(device: &wgpu::Device, module: &wgpu::ShaderModule, storage: Storage, vec4: bool) -> Pipelines {
        let mut p = Pipelines::default();
        p.add(
            device,
            module,
            "batch_norm_backward_reduce",
            &REDUCE_FLAGS,
            reduce_wanted,
        );
        crate::kernels::cpu::add_batch_norm_serial_backward(&mut p, device, storage, vec4);
        p.add(device, module, "batch_norm_backward_dx", &DX_FLAGS, |f| !f[1] || f[0]);
        p.add(
            device,
            module,
            "batch_norm_backward_dx_aligned",
            &DX_ALIGNED_FLAGS,
            |f| !f[1] || (f[0] && !f[2]),
        );
        if !vec4 {
            for entry in [
                "batch_norm_backward_finalize",
                "batch_norm_backward_eval_coef",
                "batch_norm_backward_export",
                "batch_norm_backward_finalize_imported",
            ] {
                p.add_all(device, module, entry, &[]);
            }
        }
        p
    }
}

impl Kernel for BatchNormBackwardKernel {
    fn build(device: &wgpu::Device, storage: Storage) -> Self {
        let module = crate::kernels::shader_module(device, "batch_norm/backward.wgsl", storage, false);
        let vec4 = vec4_module(device, "batch_norm/backward.wgsl", storage);
        Self {
            device: device.clone(),
            storage,
            pipelines: Self::build_pipelines(device, &module, storage, false),
            pipelines_vec4: vec4.as_ref().map(|m| Self::build_pipelines(device, m, storage, true)),
            placeholders: std::array::from_fn(|_| placeholder(device, "batch_norm backward placeholder")),
            channel: crate::kernels::cpu::batch_norm_channel_backward(device, storage),
        }
    }
}

storage_constructors!(BatchNormBackwardKernel, "x, dy, dx");

impl BatchNormBackwardKernel {
    /// A backward plan for inputs of `shape` = `(N, C, *)`. `dropout` is the dropout fused
    /// into the forward (its mask is applied to `dy`) with the mode it ran in (eval keeps
    /// every element at the eval scale), if any. The reduce pass takes the default
    /// [`ReduceSplit`] ([`crate::tuning::default_reduce_split`]).
    pub fn plan(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &BatchNormConfig,
        dropout: Option<(DropoutConfig, bool)>,
    ) -> Result<BatchNormBackwardPlan> {
        self.plan_with(device, shape, config, dropout, None)
    }

    /// [`plan`](Self::plan) with the reduce pass's [`ReduceSplit`] given (`None`: the default).
    pub fn plan_with(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &BatchNormConfig,
        dropout: Option<(DropoutConfig, bool)>,
        split: Option<ReduceSplit>,
    ) -> Result<BatchNormBackwardPlan> {
        let options = BatchNormBackwardPlanOptions {
            split,
            ..Default::default()
        };
        self.plan_with_options(device, shape, config, dropout, &options)
    }

    /// [`plan`](Self::plan) with every geometry override ([`BatchNormBackwardPlanOptions`]).
    pub fn plan_with_options(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &BatchNormConfig,
        dropout: Option<(DropoutConfig, bool)>,
        options: &BatchNormBackwardPlanOptions,
    ) -> Result<BatchNormBackwardPlan> {
        let split = options.split;
        check_device(OP, &self.device, device)?;
        config.validate()?;
        let dims = BnDims::of(OP, shape, config.num_features)?;
        let split = ReduceSplit::resolve(split, OP, device, &dims)?;
        let stats_chunk = split.chunk();
        let limits = BindLimits::of(device);
        let max = limits.max_workgroups_per_dim;
        let (ranges, parts) = sample_ranges(OP, &dims, self.storage, &limits, stats_chunk)?;
        let partials_bytes = dims.c * parts * 16;
        limits.check_size(OP, "partial sums in bytes", partials_bytes)?;
        let channel_fits = self.channel.is_some() && ranges.len() == 1 && dims.s.is_multiple_of(4);
        let path = channel_choice(
            options.channel_pass,
            channel_fits,
            options.split,
            dims.c,
            "backward",
            "",
        )?;
        let sample_elems = dims.c * dims.s;
        let (div_s, div_c) = (FastDiv::new(dims.s).words(), FastDiv::new(dims.c).words());
        // Quads per invocation of the dx pass: the aligned entry points take runs, the general
        // one single quads (S % 4 == 0 with S < 4·run: aligned single quads).
        let run = match default_normalize_run(device.adapter_info().device_type) {
            run if runs_align(dims.s, run) => run,
            _ => 1,
        };
        let d = match &dropout {
            Some((d, training)) => d.params(*training)?,
            None => DropParams {
                threshold: 0,
                flags: 0,
                scale: 1.0,
            },
        };
        // Per range, one uniform per (batch statistics, accumulate dx, accumulate params)
        // combination, indexed as in `encode`.
        let uniforms = |r: &SampleRange| -> Vec<wgpu::Buffer> {
            (0..8usize)
                .map(|variant| {
                    let mut flags = 0;
                    for (bit, flag) in [(1, FLAG_BATCH_STATS), (2, FLAG_ACCUM_DX), (4, FLAG_ACCUM_PARAMS)] {
                        if variant & bit != 0 {
                            flags |= flag;
                        }
                    }
                    if config.affine {
                        flags |= FLAG_AFFINE;
                    }
                    let params = BnBackwardParams {
                        n: r.range.count as u32,
                        c: dims.c as u32,
                        s: dims.s as u32,
                        m: (r.range.count * dims.s) as u32,
                        chunk_len: stats_chunk,
                        chunks: r.stats_chunks as u32,
                        flags,
                        total: (r.range.count * sample_elems) as u32,
                        drop_threshold: d.threshold,
                        drop_flags: d.flags,
                        drop_scale: d.scale,
                        part_base: r.part_base as u32,
                        parts: parts as u32,
                        m_all: dims.m as u32,
                        elem_base: (r.range.start * sample_elems) as u32,
                        first: u32::from(r.range.start == 0),
                        div_s,
                        div_c,
                        run,
                        chan_base: 0,
                        group_chans: 1,
                        _pad: 0,
                    };
                    uniform_buffer(device, "batch_norm backward params", &params)
                })
                .collect()
        };
        let mut per_range = Vec::with_capacity(ranges.len());
        for r in &ranges {
            per_range.push(BnbRange {
                range: r.range,
                uniforms: uniforms(r),
                reduce_groups: reduce_groups(OP, split, dims.c * r.stats_chunks, max)?,
                dx_groups: fold_workgroups(
                    OP,
                    (r.range.count * sample_elems).div_ceil(4 * WORKGROUP * u64::from(run)),
                    max,
                )?,
            });
        }
        let scratch = |label: &str, bytes: u64| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let scratch_copyable = |label: &str, bytes: u64| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        Ok(BatchNormBackwardPlan {
            kernel: self.clone(),
            config: config.clone(),
            dropout,
            shape: shape.to_vec(),
            dims,
            limits,
            ranges: per_range,
            partials: scratch("batch_norm backward partials", partials_bytes),
            // C coefficients, then C more slots for SyncBatchNorm's imported local sums.
            coef: scratch_copyable("batch_norm backward coefficients", dims.c * 32),
            split,
            finalize_groups: finalize_groups(OP, serial_finalize(split, parts), dims.c, max)?,
            serial_finalize: serial_finalize(split, parts),
            eval_coef_groups: fold_workgroups(OP, dims.c.div_ceil(64), max)?,
            parks: dropout.is_some()
                && self.storage == Storage::F32
                && device.adapter_info().device_type == wgpu::DeviceType::Cpu,
            aligned: runs_align(dims.s, run),
            path,
            channel_groups: fold_workgroups(OP, dims.c, max)?,
        })
    }
}

/// One range of whole samples of a backward plan.
#[derive(Debug)]
struct BnbRange {
    range: BindRange,
    /// Indexed by `batch_stats | accumulate.dx << 1 | accumulate.params << 2`.
    uniforms: Vec<wgpu::Buffer>,
    reduce_groups: (u32, u32),
    dx_groups: (u32, u32),
}

/// The buffers of one BatchNorm backward. `x`, `dy` and `dx` are stored as the kernel's
/// [`Storage`]; the rest is f32.
#[derive(Clone, Debug)]
pub struct BatchNormBackwardBuffers<'a> {
    /// The forward's input, `(N, C, *)`, unchanged since the forward.
    pub x: wgpu::BufferSlice<'a>,
    /// Upstream gradient `dL/dy`, same shape.
    pub dy: wgpu::BufferSlice<'a>,
    /// Output `dL/dx`, same shape (written, or added to with [`Accumulate::dx`]).
    pub dx: wgpu::BufferSlice<'a>,
    /// γ, `(C)`; required when affine.
    pub weight: Option<wgpu::BufferSlice<'a>>,
    /// The forward's saved mean, `(C)`.
    pub save_mean: wgpu::BufferSlice<'a>,
    /// The forward's saved invstd, `(C)`.
    pub save_invstd: wgpu::BufferSlice<'a>,
    /// Output `dL/dγ`, `(C)`; required when affine.
    pub dweight: Option<wgpu::BufferSlice<'a>>,
    /// Output `dL/dβ`, `(C)`; required when affine.
    pub dbias: Option<wgpu::BufferSlice<'a>>,
    /// The generator state the forward's fused dropout used; required with a fused dropout.
    pub rng: Option<wgpu::BufferSlice<'a>>,
}

/// A BatchNorm backward for one shape and configuration.
#[derive(Debug)]
pub struct BatchNormBackwardPlan {
    kernel: BatchNormBackwardKernel,
    config: BatchNormConfig,
    dropout: Option<(DropoutConfig, bool)>,
    shape: Vec<usize>,
    dims: BnDims,
    limits: BindLimits,
    /// Sample ranges, one per storage binding's worth of samples.
    ranges: Vec<BnbRange>,
    partials: wgpu::Buffer,
    coef: wgpu::Buffer,
    split: ReduceSplit,
    finalize_groups: (u32, u32),
    /// The finalize takes one invocation per channel (see [`serial_finalize`]).
    serial_finalize: bool,
    eval_coef_groups: (u32, u32),
    /// A fused dropout on a CPU adapter with f32 activations: training backwards that write
    /// dx park g = dy·m in it (see the module docs).
    parks: bool,
    /// The dx pass takes its `_aligned` entry points ([`runs_align`] with the uniform's run).
    aligned: bool,
    /// How a call with batch statistics runs (see [`BatchNormPath`]).
    path: BatchNormPath,
    channel_groups: (u32, u32),
}

impl BatchNormBackwardPlan {
    /// Whether calls with batch statistics take the one-pass-per-channel backward (see
    /// [`BatchNormBackwardPlanOptions::channel_pass`]) where x, dy and dx bind as 16-byte vectors.
    pub fn channel_pass(&self) -> bool {
        self.path == BatchNormPath::ChannelPass
    }

    /// How the activations this plan reads and writes are stored (its kernel's storage).
    pub fn storage(&self) -> Storage {
        self.kernel.storage
    }

    /// The input shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The fused dropout whose mask is applied to `dy`, and the mode it ran in.
    pub fn dropout(&self) -> Option<&(DropoutConfig, bool)> {
        self.dropout.as_ref()
    }

    /// Sample ranges each call dispatches: 1 unless the input exceeds one storage binding.
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }

    /// How the reduce pass splits each channel.
    pub fn split(&self) -> ReduceSplit {
        self.split
    }

    /// Checks the buffers without recording anything.
    pub fn validate(&self, b: &BatchNormBackwardBuffers<'_>) -> Result<()> {
        self.args(b).map(|_| ())
    }

    /// Checks every buffer of a call and returns them as the call's arguments.
    fn args<'s, 'a>(&self, b: &'s BatchNormBackwardBuffers<'a>) -> Result<CallArgs<'s, 'a>> {
        let x_bytes = self.dims.total * self.kernel.storage.element_bytes();
        let c_bytes = self.dims.c * 4;
        let mut args = CallArgs::new(OP, &self.limits);
        args.read_ranged("x", &b.x, x_bytes)?;
        args.read_ranged("dy", &b.dy, x_bytes)?;
        args.write_ranged("dx", &b.dx, x_bytes)?;
        args.read("save_mean", &b.save_mean, c_bytes)?;
        args.read("save_invstd", &b.save_invstd, c_bytes)?;
        if self.config.affine {
            for (what, s, out) in [
                ("weight", &b.weight, false),
                ("dweight", &b.dweight, true),
                ("dbias", &b.dbias, true),
            ] {
                let s = s.as_ref().ok_or_else(|| Error::Buffer {
                    op: OP,
                    what,
                    reason: "is required when affine".into(),
                })?;
                if out {
                    args.write(what, s, c_bytes)?;
                } else {
                    args.read(what, s, c_bytes)?;
                }
            }
        }
        if self.dropout.is_some() {
            let rng = b.rng.as_ref().ok_or_else(|| Error::Buffer {
                op: OP,
                what: "rng",
                reason: "is required with a fused dropout".into(),
            })?;
            args.read("rng", rng, RNG_STATE_BYTES)?;
        }
        args.check_aliasing()?;
        Ok(args)
    }

    /// Records the backward. `batch_stats` says whether the forward normalized with batch
    /// statistics (training, or no running statistics): then dx flows through the mean and
    /// variance. Checks everything first: on error nothing is recorded.
    pub fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        batch_stats: bool,
        accumulate: Accumulate,
        b: &BatchNormBackwardBuffers<'_>,
    ) -> Result<()> {
        check_device(OP, &self.kernel.device, device)?;
        let args = self.args(b)?;
        if batch_stats && self.dims.m == 1 {
            return Err(Error::shape(
                OP,
                "input",
                &self.shape,
                "more than 1 value per channel for batch statistics",
            ));
        }
        args.record(device, encoder, "batch_norm backward", || {
            self.dispatches(device, batch_stats, accumulate, b, Step::Whole)
        })
    }

    /// Bytes a SyncBatchNorm backward step exports ([`Self::encode_sync_sums`]: C·16) and
    /// imports ([`Self::encode_sync_dx`]: 2·C·16).
    pub fn sync_bytes(&self) -> (u64, u64) {
        (self.dims.c * 16, self.dims.c * 32)
    }

    /// SyncBatchNorm backward (batch statistics), step 1: records the reduce and copies each
    /// channel's local `(K, Σ(x − K), Σdy, Σdy·(x − K))` (4 f32, K this slice's shift) into
    /// `export` (`COPY_DST`). The caller turns them into Σdy and Σdy·x̂ around the global mean,
    /// all-reduces, and writes the import of [`Self::encode_sync_dx`]. Not with a fused
    /// dropout.
    pub fn encode_sync_sums(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        b: &BatchNormBackwardBuffers<'_>,
        export: &wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        check_device(OP, &self.kernel.device, device)?;
        self.check_sync()?;
        let args = self.args(b)?;
        crate::kernels::check_copy(OP, "export", export, self.sync_bytes().0, wgpu::BufferUsages::COPY_DST)?;
        args.record(device, encoder, "batch_norm sync backward sums", || {
            self.dispatches(device, true, Accumulate::default(), b, Step::SyncSums)
        })?;
        encoder.copy_buffer_to_buffer(&self.coef, 0, export.buffer(), export.offset(), self.sync_bytes().0);
        Ok(())
    }

    /// SyncBatchNorm backward, step 3: copies `import` (`COPY_SRC`, 2·C·4 f32: per channel
    /// `(K, mean − K, Σdy, Σdy·x̂)` with the global mean and sums over every rank, then per
    /// channel `(Σdy, Σdy·x̂, M, 0)` with this rank's sums and the global count M) into the
    /// plan, then records dγ = this rank's Σdy·x̂ and dβ = its Σdy (as PyTorch's SyncBatchNorm:
    /// the data-parallel gradient all-reduce adds them) and dx from the global sums.
    pub fn encode_sync_dx(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        b: &BatchNormBackwardBuffers<'_>,
        import: &wgpu::BufferSlice<'_>,
        accumulate: Accumulate,
    ) -> Result<()> {
        check_device(OP, &self.kernel.device, device)?;
        self.check_sync()?;
        let args = self.args(b)?;
        crate::kernels::check_copy(OP, "import", import, self.sync_bytes().1, wgpu::BufferUsages::COPY_SRC)?;
        // The copy only fills the plan's scratch: harmless if recording then fails.
        encoder.copy_buffer_to_buffer(import.buffer(), import.offset(), &self.coef, 0, self.sync_bytes().1);
        args.record(device, encoder, "batch_norm sync backward dx", || {
            self.dispatches(device, true, accumulate, b, Step::SyncDx)
        })
    }

    fn check_sync(&self) -> Result<()> {
        if self.dropout.is_some() {
            return Err(Error::invalid(OP, "a SyncBatchNorm step cannot fuse a dropout"));
        }
        Ok(())
    }

    /// The dispatches of one call (or one step of SyncBatchNorm's split), with their bind groups.
    fn dispatches<'p>(
        &'p self,
        device: &wgpu::Device,
        batch_stats: bool,
        accumulate: Accumulate,
        b: &BatchNormBackwardBuffers<'_>,
        step: Step,
    ) -> Result<Vec<Dispatch<'p>>> {
        let k = &self.kernel;
        let sample_bytes = self.dims.c * self.dims.s * k.storage.element_bytes();
        let c_bytes = self.dims.c * 4;
        let variant = usize::from(batch_stats) | usize::from(accumulate.dx) << 1 | usize::from(accumulate.params) << 2;
        let affine = self.config.affine;
        let ph = &k.placeholders;
        let rng = binding_or(self.dropout.is_some(), &b.rng, &ph[3], RNG_STATE_BYTES);
        let (save_mean, save_invstd) = (binding(&b.save_mean, c_bytes), binding(&b.save_invstd, c_bytes));
        let (partials, coef) = (self.partials.as_entire_binding(), self.coef.as_entire_binding());
        let drop = self.dropout.is_some();
        let serial = self.split.serial();
        let eval = !batch_stats;
        let park = self.parks && batch_stats && !accumulate.dx;
        let finalize = k.pipelines.get(
            if self.serial_finalize {
                "batch_norm_backward_finalize_serial"
            } else {
                "batch_norm_backward_finalize"
            },
            &[],
        )?;
        let weight = binding_or(affine, &b.weight, &ph[0], c_bytes);
        let channel_pass = self.path == BatchNormPath::ChannelPass && batch_stats && step == Step::Whole;
        if let (Some(channel), true, [c]) = (&k.channel, channel_pass, self.ranges.as_slice()) {
            let (at, len) = (c.range.start * sample_bytes, c.range.count * sample_bytes);
            if vec4_bindable(&[&b.x, &b.dy, &b.dx], at, len) {
                let pass = channel.get(
                    "batch_norm_backward_channel",
                    &[("DROPOUT", drop.into()), ("ACCUMULATE", accumulate.dx.into())],
                )?;
                let entries = [
                    (0, c.uniforms[variant].as_entire_binding()),
                    (1, binding_at(&b.x, at, len)),
                    (2, binding_at(&b.dy, at, len)),
                    (3, binding_at(&b.dx, at, len)),
                    (4, weight),
                    (6, save_invstd),
                    (9, binding_or(affine, &b.dweight, &ph[1], c_bytes)),
                    (10, binding_or(affine, &b.dbias, &ph[2], c_bytes)),
                    (11, rng),
                ];
                let group = bind_group(device, "batch_norm_backward_channel", pass, &entries);
                return Ok(vec![(pass, group, self.channel_groups)]);
            }
        }
        if step == Step::SyncDx {
            let imported = k.pipelines.get("batch_norm_backward_finalize_imported", &[])?;
            let entries = [
                (0, self.ranges[0].uniforms[variant].as_entire_binding()),
                (4, weight.clone()),
                (6, save_invstd.clone()),
                (8, coef.clone()),
                (9, binding_or(affine, &b.dweight, &ph[1], c_bytes)),
                (10, binding_or(affine, &b.dbias, &ph[2], c_bytes)),
            ];
            let mut passes = vec![(
                imported,
                bind_group(device, "batch_norm_backward_finalize_imported", imported, &entries),
                self.eval_coef_groups,
            )];
            passes.extend(self.dx_passes(device, b, variant, accumulate, drop, false, &coef, &rng)?);
            return Ok(passes);
        }
        let mut passes = Vec::new();
        if !batch_stats {
            let entries = [
                (0, self.ranges[0].uniforms[variant].as_entire_binding()),
                (4, weight.clone()),
                (5, save_mean.clone()),
                (6, save_invstd.clone()),
                (8, coef.clone()),
            ];
            let eval_coef = k.pipelines.get("batch_norm_backward_eval_coef", &[])?;
            passes.push((
                eval_coef,
                bind_group(device, "batch_norm_backward_eval_coef", eval_coef, &entries),
                self.eval_coef_groups,
            ));
        }
        for c in &self.ranges {
            let (at, len) = (c.range.start * sample_bytes, c.range.count * sample_bytes);
            let vec4 = self.dims.s.is_multiple_of(4) && vec4_bindable(&[&b.x, &b.dy, &b.dx], at, len);
            let pipelines = match &k.pipelines_vec4 {
                Some(v) if vec4 => v,
                _ => &k.pipelines,
            };
            let entry = if serial {
                "batch_norm_backward_reduce_serial"
            } else {
                "batch_norm_backward_reduce"
            };
            let reduce = pipelines.get(
                entry,
                &[("DROPOUT", drop.into()), ("EVAL", eval.into()), ("PARK", park.into())],
            )?;
            // Every reduce entry point's layout holds dx (the eval ones write it).
            let entries = [
                (0, c.uniforms[variant].as_entire_binding()),
                (1, binding_at(&b.x, at, len)),
                (2, binding_at(&b.dy, at, len)),
                (3, binding_at(&b.dx, at, len)),
                (5, save_mean.clone()),
                (7, partials.clone()),
                (8, coef.clone()),
                (11, rng.clone()),
            ];
            passes.push((
                reduce,
                bind_group(device, "batch_norm_backward_reduce", reduce, &entries),
                c.reduce_groups,
            ));
        }
        let partials_for_export = partials.clone();
        // The whole-call pass takes the first range's uniform: it holds the totals.
        let entries = [
            (0, self.ranges[0].uniforms[variant].as_entire_binding()),
            (4, weight),
            (5, save_mean),
            (6, save_invstd),
            (7, partials),
            (8, coef.clone()),
            (9, binding_or(affine, &b.dweight, &ph[1], c_bytes)),
            (10, binding_or(affine, &b.dbias, &ph[2], c_bytes)),
        ];
        let finalize_pass = (
            finalize,
            bind_group(device, "batch_norm_backward_finalize", finalize, &entries),
            self.finalize_groups,
        );
        if !batch_stats {
            // The reduce wrote dx; finalize only for dγ and dβ.
            if affine {
                passes.push(finalize_pass);
            }
            return Ok(passes);
        }
        if step == Step::SyncSums {
            let export = k.pipelines.get("batch_norm_backward_export", &[])?;
            let entries = [
                (0, self.ranges[0].uniforms[variant].as_entire_binding()),
                (7, partials_for_export),
                (8, coef.clone()),
            ];
            passes.push((
                export,
                bind_group(device, "batch_norm_backward_export", export, &entries),
                self.channel_groups,
            ));
            return Ok(passes);
        }
        passes.push(finalize_pass);
        passes.extend(self.dx_passes(device, b, variant, accumulate, drop, park, &coef, &rng)?);
        Ok(passes)
    }

    /// The dx passes over every sample range, reading the coefficients in `coef`.
    #[allow(clippy::too_many_arguments)]
    fn dx_passes<'p>(
        &'p self,
        device: &wgpu::Device,
        b: &BatchNormBackwardBuffers<'_>,
        variant: usize,
        accumulate: Accumulate,
        drop: bool,
        park: bool,
        coef: &wgpu::BindingResource<'_>,
        rng: &wgpu::BindingResource<'_>,
    ) -> Result<Vec<Dispatch<'p>>> {
        let k = &self.kernel;
        let sample_bytes = self.dims.c * self.dims.s * k.storage.element_bytes();
        let mut passes = Vec::with_capacity(self.ranges.len());
        for c in &self.ranges {
            let (at, len) = (c.range.start * sample_bytes, c.range.count * sample_bytes);
            let vec4 = vec4_bindable(&[&b.x, &b.dy, &b.dx], at, len);
            let pipelines = match &k.pipelines_vec4 {
                Some(v) if vec4 => v,
                _ => &k.pipelines,
            };
            // The aligned pass adds to dx by its ACCUMULATE flag, the general one by the
            // uniform's; parking only runs when dx is written.
            let dx = if self.aligned {
                pipelines.get(
                    "batch_norm_backward_dx_aligned",
                    &[
                        ("DROPOUT", drop.into()),
                        ("PARK", park.into()),
                        ("ACCUMULATE", accumulate.dx.into()),
                    ],
                )?
            } else {
                pipelines.get(
                    "batch_norm_backward_dx",
                    &[("DROPOUT", drop.into()), ("PARK", park.into())],
                )?
            };
            let entries = [
                (0, c.uniforms[variant].as_entire_binding()),
                (1, binding_at(&b.x, at, len)),
                (2, binding_at(&b.dy, at, len)),
                (3, binding_at(&b.dx, at, len)),
                (8, coef.clone()),
                (11, rng.clone()),
            ];
            passes.push((
                dx,
                bind_group(device, "batch_norm_backward_dx", dx, &entries),
                c.dx_groups,
            ));
        }
        Ok(passes)
    }
}

/// Which part of a call `dispatches` records: all of it, or one step of SyncBatchNorm's split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Whole,
    SyncSums,
    SyncDx,
}
