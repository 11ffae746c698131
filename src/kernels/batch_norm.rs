//! BatchNorm forward, low level: [`BatchNormKernel`] (pipelines, one per device) and
//! [`BatchNormPlan`] (one per input shape and configuration) that encodes into a caller's
//! `CommandEncoder` on caller buffers. See `shaders/batch_norm/forward.wgsl` for the math and geometry.
//!
//! A training step records, in one compute pass:
//!
//! | dispatch              | workgroups           | reads                     | writes                    |
//! |-----------------------|----------------------|---------------------------|---------------------------|
//! | `batch_norm_stats`    | C · chunks           | x                         | partials (mean, M2), +1 to num_batches_tracked (when tracking) |
//! | `batch_norm_finalize` | C                    | partials                  | save_mean/invstd, running |
//! | `batch_norm_normalize`| ⌈N·C·S / (1024·run)⌉ | x, centre (K, mean, γ, β) | y (× the mask with `DROPOUT`) |
//!
//! In eval mode with running statistics only `batch_norm_finalize_eval` and `batch_norm_normalize` run. `run`
//! is [`BatchNormPlanOptions::normalize_run`] (quads of 4 elements per invocation).
//!
//! On CPU adapters with 8-lane subgroups a call with batch statistics is one dispatch instead,
//! `batch_norm_channel_forward` (C workgroups of one subgroup each; `kernels::cpu`; see
//! [`BatchNormPlanOptions::channel_pass`]).

use crate::context::Kernel;
use crate::error::{Error, Result};
use crate::kernels::dropout::{DropParams, DropoutConfig, RNG_STATE_BYTES};
use crate::kernels::{
    bind_group, bind_ranges, binding, binding_at, binding_or, check_device, check_eps, check_index_limit,
    fold_workgroups, gcd, placeholder, uniform_buffer, vec4_bindable, vec4_module, BindLimits, BindRange, CallArgs,
    Dispatch, FastDiv, Pipelines, Storage,
};

const OP: &str = "batch_norm";

/// Entry points in `shaders/batch_norm/forward.wgsl` that get a pipeline.
pub(crate) const ENTRY_POINTS: &[&str] = &[
    "batch_norm_stats",
    "batch_norm_finalize",
    "batch_norm_finalize_eval",
    "batch_norm_normalize",
    "batch_norm_export",
    "batch_norm_count",
    "batch_norm_finalize_merged",
];

/// `batch_norm_normalize`'s override flags: the fused dropout, and S % 4 == 0 with S ≥ 4·run (see
/// `normalize_run` in the shader).
pub(crate) const NORMALIZE_FLAGS: [&str; 2] = ["DROPOUT", "ALIGNED"];
const WORKGROUP: u64 = 256;
/// Workgroup size of the one-invocation-per-channel passes (`batch_norm_finalize_eval`, the `_serial`
/// finalizes of forward and backward).
const CHANNEL_WORKGROUP: u64 = 64;

/// Default elements of one channel reduced by one `batch_norm_stats` / `batch_norm_backward_reduce` workgroup on a GPU
/// (16 per invocation); see [`default_reduce_split`].
pub const DEFAULT_STATS_CHUNK: u32 = 4096;

/// Smallest chunk [`default_reduce_split`] gives one invocation on a CPU adapter.
pub const MIN_INVOCATION_CHUNK: u32 = 64;

/// Most loop iterations a plan asks of one invocation of a `_serial` pass (a chunk's quads, a
/// channel's partials). llvmpipe and lavapipe stop every shader loop nest after 65535
/// iterations (Mesa's `LP_MAX_TGSI_LOOP_ITERATIONS`, a guard against endless loops): a finalize
/// that merged 100 000 partials in one invocation silently kept the first 65 535. Past this
/// bound a plan takes the workgroup finalize, and a [`ReduceSplit::Invocation`] chunk is at
/// most `4 ·` this many elements.
pub const SERIAL_LOOP_MAX: u64 = 16384;

/// Whether a plan with `split` finalizes with one invocation per channel (or group), whose
/// loop makes `trips` iterations: with [`ReduceSplit::Invocation`], within [`SERIAL_LOOP_MAX`].
pub(crate) fn serial_finalize(split: ReduceSplit, trips: u64) -> bool {
    split.serial() && trips <= SERIAL_LOOP_MAX
}

/// How the BatchNorm reduce passes (forward statistics, backward sums) split each channel's
/// `M = N·∏spatial` elements into chunks, and who reduces a chunk. Either way a channel's
/// chunk results are merged in a fixed order by the finalize pass, so results agree within
/// rounding whatever the split; forward and backward plans choose theirs independently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceSplit {
    /// Chunks of `chunk` elements (a positive multiple of 256), one workgroup of 256
    /// invocations each, merged in workgroup memory; one workgroup per channel merges the
    /// chunks. Neighbouring invocations read neighbouring quads: the GPU layout. Smaller chunks
    /// spread a channel over more workgroups (small C, large N·H·W).
    Workgroup {
        /// Elements of one channel per workgroup.
        chunk: u32,
    },
    /// Chunks of `chunk` elements (a positive multiple of 4), one invocation each, and one
    /// invocation per channel merging them: no workgroup memory and no barriers. The layout for
    /// CPU adapters, which run a workgroup's invocations a SIMD group at a time, so that a
    /// workgroup merge costs them more than the loads it merges (on lavapipe the two merges of
    /// a BatchNorm forward took 40% of `batch_norm_train_forward`).
    Invocation {
        /// Elements of one channel per invocation.
        chunk: u32,
    },
}

impl ReduceSplit {
    /// Elements of one channel per chunk.
    pub fn chunk(&self) -> u32 {
        match *self {
            ReduceSplit::Workgroup { chunk } | ReduceSplit::Invocation { chunk } => chunk,
        }
    }

    /// Whether a chunk is reduced by one invocation (the `_serial` entry points).
    pub(crate) fn serial(&self) -> bool {
        matches!(self, ReduceSplit::Invocation { .. })
    }

    /// The split a plan for `dims` on `device` uses: `split` after checking it, or the default.
    pub(crate) fn resolve(split: Option<Self>, op: &'static str, device: &wgpu::Device, dims: &BnDims) -> Result<Self> {
        let split = split.unwrap_or_else(|| {
            let threads = crate::kernels::host_threads();
            default_reduce_split(device.adapter_info().device_type, dims.c, dims.m, threads)
        });
        let (multiple, kind) = match split {
            ReduceSplit::Workgroup { .. } => (WORKGROUP as u32, "Workgroup"),
            ReduceSplit::Invocation { .. } => (4, "Invocation"),
        };
        if split.serial() && u64::from(split.chunk()) > 4 * SERIAL_LOOP_MAX {
            return Err(Error::invalid(
                op,
                format!(
                    "a ReduceSplit::Invocation chunk must be at most {} elements (one invocation \
                     loops over its quads; CPU drivers stop loops after 65535 iterations), got {}",
                    4 * SERIAL_LOOP_MAX,
                    split.chunk()
                ),
            ));
        }
        if split.chunk() == 0 || !split.chunk().is_multiple_of(multiple) {
            return Err(Error::invalid(
                op,
                format!(
                    "a ReduceSplit::{kind} chunk must be a positive multiple of {multiple}, got {}",
                    split.chunk()
                ),
            ));
        }
        Ok(split)
    }
}

/// The [`ReduceSplit`] a plan uses unless told otherwise, for `c` channels of `m` =
/// N·∏spatial elements on an adapter of `device_type`, with `threads` host threads.
///
/// - GPUs: [`ReduceSplit::Workgroup`] with [`DEFAULT_STATS_CHUNK`], so that a small C with a
///   large N·H·W still spreads over many workgroups (C = 1, M = 2^24: 4096 workgroups).
/// - CPU adapters (lavapipe, llvmpipe, WARP): [`ReduceSplit::Invocation`], each channel cut
///   into as many chunks as give every host thread two workgroups of 256 invocations, each chunk
///   at least [`MIN_INVOCATION_CHUNK`] elements (a multiple of 4).
pub fn default_reduce_split(device_type: wgpu::DeviceType, c: u64, m: u64, threads: usize) -> ReduceSplit {
    if device_type != wgpu::DeviceType::Cpu {
        return ReduceSplit::Workgroup {
            chunk: DEFAULT_STATS_CHUNK,
        };
    }
    let wanted = 2 * threads.max(1) as u64 * WORKGROUP;
    let per_channel = wanted.div_ceil(c.max(1));
    let chunk = m.div_ceil(per_channel).next_multiple_of(4);
    ReduceSplit::Invocation {
        chunk: chunk.clamp(u64::from(MIN_INVOCATION_CHUNK), 4 * SERIAL_LOOP_MAX) as u32,
    }
}

const FLAG_AFFINE: u32 = 1;
const FLAG_TRACK: u32 = 2;
const FLAG_CUMULATIVE: u32 = 4;
/// Training with running statistics: the stats pass increments num_batches_tracked.
const FLAG_COUNT: u32 = 8;

/// Largest element count a single call indexes with u32 arithmetic (with headroom for one
/// chunk past the end).
const MAX_ELEMENTS: u64 = 1 << 31;

/// BatchNorm hyper-parameters, with PyTorch's meanings and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// C, the size of axis 1 of the input.
    pub num_features: usize,
    /// Added to the variance before the square root. Default `1e-5`; must be finite and > 0.
    pub eps: f32,
    /// Running-statistics factor `m` in `running = (1 − m)·running + m·batch`. `None` means a
    /// cumulative average, `m = 1/num_batches_tracked`. Default `Some(0.1)`; must be in [0, 1].
    pub momentum: Option<f32>,
    /// Learnable per-channel γ (weight) and β (bias). Default `true`. When `false`, γ = 1, β = 0.
    pub affine: bool,
    /// Keep running statistics and use them in eval mode. Default `true`. When `false`, batch
    /// statistics are used in both modes and nothing is stored.
    pub track_running_stats: bool,
}

impl BatchNormConfig {
    /// PyTorch's defaults for `num_features` channels.
    pub fn new(num_features: usize) -> Self {
        Self {
            num_features,
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
        }
    }

    /// Checks every field's domain.
    pub fn validate(&self) -> Result<()> {
        if self.num_features == 0 {
            return Err(Error::invalid(OP, "num_features must be at least 1"));
        }
        check_index_limit(
            OP,
            "num_features",
            self.num_features as u64,
            "2^31 channels (u32 indexing)",
        )?;
        check_eps(OP, self.eps)?;
        if let Some(m) = self.momentum {
            if !(0.0..=1.0).contains(&m) {
                return Err(Error::invalid(OP, format!("momentum must be in [0, 1], got {m}")));
            }
        }
        Ok(())
    }
}

/// Uniform parameters; mirrors `struct Params` in `shaders/batch_norm/forward.wgsl` field by field.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct BnParams {
    pub(crate) n: u32,
    pub(crate) c: u32,
    pub(crate) s: u32,
    pub(crate) m: u32,
    pub(crate) chunk_len: u32,
    pub(crate) chunks: u32,
    pub(crate) flags: u32,
    pub(crate) total: u32,
    pub(crate) eps: f32,
    pub(crate) momentum: f32,
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
    /// Index in `centre` of the dispatch's channel 0 (GroupNorm's ranges; 0 here).
    pub(crate) chan_base: u32,
}
const _: () = assert!(std::mem::size_of::<BnParams>() == 96);

/// Options of a [`BatchNormPlan`] beyond the shape and configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchNormPlanOptions {
    /// How the statistics pass splits each channel. Default `None`: [`default_reduce_split`]
    /// for the device's adapter type and the host's available parallelism.
    pub split: Option<ReduceSplit>,
    /// Fuse a dropout into the normalize pass: `y = dropout(BatchNorm(x))` in one pass over the
    /// activations, with the mask of [`crate::rng`] over flat element indices. Default `None`.
    pub dropout: Option<DropoutConfig>,
    /// Quads (4 consecutive elements) each invocation of the normalize pass takes, 1 to
    /// [`MAX_NORMALIZE_RUN`]: a channel's coefficients are read once per run. Default `None`:
    /// [`default_normalize_run`] for the device's adapter type.
    pub normalize_run: Option<u32>,
    /// With batch statistics, one dispatch instead of three: a workgroup of one 8-lane subgroup
    /// per channel reduces it, finishes its statistics and normalizes it
    /// (`shaders/cpu/batch_norm/forward_channel.wgsl`). Possible on CPU adapters with `SUBGROUP` of at
    /// least 8 lanes and 10 storage buffers per stage, for f32 tensors within one storage
    /// binding bound as 16-byte vectors, S % 4 == 0, and a momentum (not the cumulative
    /// average). Default `None`: where possible, when `split` is `None` and there are at least
    /// two channels per host thread; `Some(false)`: never; `Some(true)`: wherever possible, or
    /// the plan fails with [`Error::Unsupported`].
    pub channel_pass: Option<bool>,
}

/// The largest [`BatchNormPlanOptions::normalize_run`].
pub const MAX_NORMALIZE_RUN: u32 = 64;

/// The normalize pass's quads per invocation on an adapter of `device_type`: 8 on CPU adapters
/// (a CPU driver loads a channel's coefficients and the generator state lane by lane; once per
/// 32 elements instead of once per 4 made lavapipe's BatchNorm forwards 1.05–1.1× faster), 1
/// elsewhere (neighbouring invocations read neighbouring quads, the access GPUs coalesce).
pub fn default_normalize_run(device_type: wgpu::DeviceType) -> u32 {
    if device_type == wgpu::DeviceType::Cpu {
        8
    } else {
        1
    }
}

/// Whether runs of `run` quads over a spatial size `s` take the `_aligned` entry points of the
/// element-wise passes (forward normalize, backward dx): S % 4 == 0, so every quad lies in one
/// channel, and S ≥ 4·run, so a run enters at most one next channel.
pub(crate) fn runs_align(s: u64, run: u32) -> bool {
    s.is_multiple_of(4) && s >= 4 * u64::from(run)
}

/// Compiled BatchNorm pipelines for one device. Build once (or get it cached from
/// [`Context::kernel`](crate::Context::kernel)); make a [`BatchNormPlan`] per input shape.
#[derive(Clone, Debug)]
pub struct BatchNormKernel {
    device: wgpu::Device,
    storage: Storage,
    /// Every entry point of `batch_norm/forward.wgsl` (`batch_norm_normalize` by `DROPOUT` and
    /// `ALIGNED`).
    pipelines: Pipelines,
    /// `batch_norm_stats`, `batch_norm_stats_serial` and `batch_norm_normalize` from the vec4
    /// variant (f32 only), for ranges whose
    /// x (and y) bind as whole 16-byte vectors (the stats pass also needs S % 4 == 0).
    pipelines_vec4: Option<Pipelines>,
    /// Stand-ins for bindings a configuration does not use: γ, β (read), running mean,
    /// running var, num_batches_tracked (read-write) and the generator state, each distinct.
    placeholders: [wgpu::Buffer; 6],
    /// The one-pass-per-channel forward (`batch_norm_channel_forward` by `DROPOUT`, vec4 variant): built
    /// where `cpu::batch_norm_channel_forward` allows.
    channel: Option<Pipelines>,
}

/// How a BatchNorm plan (forward or backward) runs a call with batch statistics. Chosen once, at
/// plan creation, by [`channel_choice`]; `encode` records the chosen path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BatchNormPath {
    /// Per-chunk statistics (or sums), a finalize per channel, then the element pass over every
    /// sample range, with the plan's [`ReduceSplit`]: the GPU path.
    ThreePass,
    /// One dispatch per call, a subgroup per channel (CPU adapters, `shaders/cpu/batch_norm/`).
    /// A call whose buffers do not bind as 16-byte vectors takes [`BatchNormPath::ThreePass`].
    ChannelPass,
}

/// The one choice of a BatchNorm plan's path: the one-pass-per-channel pass (forward or
/// backward, by `what`) where it `fits` the call and the options want it: see
/// [`BatchNormPlanOptions::channel_pass`]. By default only
/// without a `split` override (which names the three-pass geometry) and with two channels per
/// host thread (C workgroups are the pass's only parallelism).
pub(crate) fn channel_choice(
    wanted: Option<bool>,
    fits: bool,
    split: Option<ReduceSplit>,
    c: u64,
    what: &str,
    needs: &str,
) -> Result<BatchNormPath> {
    let by_default = split.is_none() && c >= 2 * crate::kernels::host_threads() as u64;
    let channel = crate::kernels::optional_pass(wanted, fits, by_default, || Error::Unsupported {
        what: format!("the one-pass-per-channel BatchNorm {what}"),
        reason: format!(
            "it needs a CPU adapter with SUBGROUP of at least 8 lanes, f32 activations within one \
             storage binding, S % 4 == 0{needs}"
        ),
    })?;
    Ok(if channel {
        BatchNormPath::ChannelPass
    } else {
        BatchNormPath::ThreePass
    })
}

impl Kernel for BatchNormKernel {
    fn build(device: &wgpu::Device, storage: Storage) -> Self {
        let module = crate::kernels::shader_module(device, "batch_norm/forward.wgsl", storage, false);
        // The GPU passes and, beside them, the reductions with one invocation per chunk (CPU
        // adapters' default split, but built everywhere: a plan may ask for either split).
        let per_range = |module: &wgpu::ShaderModule, vec4: bool| {
            let mut p = Pipelines::default();
            p.add_all(device, module, "batch_norm_stats", &[]);
            p.add_all(device, module, "batch_norm_normalize", &NORMALIZE_FLAGS);
            crate::kernels::cpu::add_batch_norm_serial_forward(&mut p, device, storage, vec4);
            p
        };
        let mut pipelines = per_range(&module, false);
        for entry in [
            "batch_norm_finalize",
            "batch_norm_finalize_eval",
            "batch_norm_export",
            "batch_norm_count",
            "batch_norm_finalize_merged",
        ] {
            pipelines.add_all(device, &module, entry, &[]);
        }
        Self {
            device: device.clone(),
            storage,
            pipelines,
            pipelines_vec4: vec4_module(device, "batch_norm/forward.wgsl", storage).map(|m| per_range(&m, true)),
            placeholders: std::array::from_fn(|_| placeholder(device, "batch_norm placeholder")),
            channel: crate::kernels::cpu::batch_norm_channel_forward(device, storage),
        }
    }
}

storage_constructors!(BatchNormKernel, "x, y");

impl BatchNormKernel {
    /// A plan for inputs of `shape` = `(N, C, *)` with the default [`ReduceSplit`].
    pub fn plan(&self, device: &wgpu::Device, shape: &[usize], config: &BatchNormConfig) -> Result<BatchNormPlan> {
        self.plan_with(device, shape, config, &BatchNormPlanOptions::default())
    }

    /// A plan with explicit [`BatchNormPlanOptions`] (reduce split, fused dropout).
    pub fn plan_with(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &BatchNormConfig,
        options: &BatchNormPlanOptions,
    ) -> Result<BatchNormPlan> {
        check_device(OP, &self.device, device)?;
        config.validate()?;
        let dims = BnDims::of(OP, shape, config.num_features)?;
        let split = ReduceSplit::resolve(options.split, OP, device, &dims)?;
        let stats_chunk = split.chunk();
        if let Some(d) = &options.dropout {
            d.validate()?;
        }
        let run = match options.normalize_run {
            Some(run) if (1..=MAX_NORMALIZE_RUN).contains(&run) => run,
            Some(run) => {
                return Err(Error::invalid(
                    OP,
                    format!("normalize_run must be 1..={MAX_NORMALIZE_RUN}, got {run}"),
                ))
            }
            None => default_normalize_run(device.adapter_info().device_type),
        };
        let limits = BindLimits::of(device);
        let max = limits.max_workgroups_per_dim;
        let sample_elems = dims.c * dims.s;
        let (ranges, parts) = sample_ranges(OP, &dims, self.storage, &limits, stats_chunk)?;
        let eval_groups = fold_workgroups(OP, dims.c.div_ceil(CHANNEL_WORKGROUP), max)?;
        let serial_finalize = serial_finalize(split, parts);
        let finalize_groups = finalize_groups(OP, serial_finalize, dims.c, max)?;
        // One vec4 per (channel, partial), then one slot where the stats pass leaves the new
        // num_batches_tracked for batch_norm_finalize (which then needs no binding of the counter).
        let partials_bytes = (dims.c * parts + 1) * 16;
        limits.check_size(
            OP,
            "stats partials in bytes (use a larger ReduceSplit chunk)",
            partials_bytes,
        )?;

        let mut flags = 0;
        if config.affine {
            flags |= FLAG_AFFINE;
        }
        if config.track_running_stats {
            flags |= FLAG_TRACK;
        }
        if config.momentum.is_none() {
            flags |= FLAG_CUMULATIVE;
        }
        let (div_s, div_c) = (FastDiv::new(dims.s).words(), FastDiv::new(dims.c).words());
        let uniform = |r: &SampleRange, training: bool| -> Result<wgpu::Buffer> {
            // Only a training step counts; the stats pass also runs in eval without running
            // statistics, where FLAG_TRACK is off anyway.
            let flags = if training && config.track_running_stats {
                flags | FLAG_COUNT
            } else {
                flags
            };
            let d = match &options.dropout {
                Some(d) => d.params(training)?,
                None => DropParams {
                    threshold: 0,
                    flags: 0,
                    scale: 1.0,
                },
            };
            let params = BnParams {
                n: r.range.count as u32,
                c: dims.c as u32,
                s: dims.s as u32,
                m: (r.range.count * dims.s) as u32,
                chunk_len: stats_chunk,
                chunks: r.stats_chunks as u32,
                flags,
                total: (r.range.count * sample_elems) as u32,
                eps: config.eps,
                momentum: config.momentum.unwrap_or(0.0),
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
            };
            Ok(uniform_buffer(device, "batch_norm params", &params))
        };
        let mut per_range = Vec::with_capacity(ranges.len());
        for r in &ranges {
            per_range.push(BnRange {
                range: r.range,
                uniforms: [uniform(r, false)?, uniform(r, true)?],
                stats_groups: reduce_groups(OP, split, dims.c * r.stats_chunks, max)?,
                // Both normalize variants handle `run` quads of 4 elements per invocation.
                normalize_groups: fold_workgroups(
                    OP,
                    (r.range.count * sample_elems).div_ceil(WORKGROUP * 4 * u64::from(run)),
                    max,
                )?,
            });
        }
        // The one-pass-per-channel forward: one range, quads within planes, a momentum.
        let channel_fits = self.channel.is_some()
            && ranges.len() == 1
            && dims.s.is_multiple_of(4)
            && (config.momentum.is_some() || !config.track_running_stats);
        let path = channel_choice(
            options.channel_pass,
            channel_fits,
            options.split,
            dims.c,
            "forward",
            ", 10 storage buffers per stage, and a momentum (not the cumulative average)",
        )?;
        let channel_groups = fold_workgroups(OP, dims.c, max)?;
        let partials = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("batch_norm partials"),
            size: partials_bytes,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let centre = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("batch_norm centre"),
            // C coefficients, then C slots for SyncBatchNorm's imported means.
            size: dims.c * 32,
            // SyncBatchNorm's steps copy it out and back in.
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(BatchNormPlan {
            kernel: self.clone(),
            config: config.clone(),
            shape: shape.to_vec(),
            dims,
            limits,
            dropout: options.dropout,
            split,
            ranges: per_range,
            partials,
            partials_bytes,
            centre,
            finalize_groups,
            serial_finalize,
            eval_groups,
            aligned: runs_align(dims.s, run),
            path,
            channel_groups,
        })
    }
}

/// Workgroups of a reduce pass over `units` (channel, chunk) pairs: one workgroup each, or one
/// invocation each in workgroups of 256.
pub(crate) fn reduce_groups(op: &'static str, split: ReduceSplit, units: u64, max: u32) -> Result<(u32, u32)> {
    let groups = if split.serial() {
        units.div_ceil(WORKGROUP)
    } else {
        units
    };
    fold_workgroups(op, groups, max)
}

/// Workgroups of a finalize pass over `c` channels: one workgroup each, or one invocation each
/// in workgroups of [`CHANNEL_WORKGROUP`] (`ReduceSplit::Invocation`).
pub(crate) fn finalize_groups(op: &'static str, serial: bool, c: u64, max: u32) -> Result<(u32, u32)> {
    let groups = if serial { c.div_ceil(CHANNEL_WORKGROUP) } else { c };
    fold_workgroups(op, groups, max)
}

/// A range of whole samples dispatched together, with its stats chunks and the index of its
/// first partial among a channel's partials.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SampleRange {
    pub range: BindRange,
    pub stats_chunks: u64,
    pub part_base: u64,
}

/// Cuts the batch into ranges of whole samples that each fit in one storage binding (a single
/// range unless the input is larger than `max_storage_buffer_binding_size`), starting at
/// multiples of 4 elements (a fused dropout's Philox call covers 4 elements). Returns the
/// ranges and the total partials per channel.
pub(crate) fn sample_ranges(
    op: &'static str,
    dims: &BnDims,
    storage: Storage,
    limits: &BindLimits,
    stats_chunk: u32,
) -> Result<(Vec<SampleRange>, u64)> {
    let sample_elems = dims.c * dims.s;
    let ranges = bind_ranges(
        op,
        "one sample (C·∏spatial elements) in bytes",
        dims.n,
        sample_elems * storage.element_bytes(),
        limits,
        4 / gcd(sample_elems, 4),
    )?;
    let mut parts = 0;
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let stats_chunks = (range.count * dims.s).div_ceil(u64::from(stats_chunk));
        out.push(SampleRange {
            range,
            stats_chunks,
            part_base: parts,
        });
        parts += stats_chunks;
    }
    Ok((out, parts))
}

/// One range of whole samples of a BatchNorm plan (the whole batch unless the input exceeds
/// one storage binding): its uniforms ([eval, train]) and workgroup counts.
#[derive(Debug)]
struct BnRange {
    range: BindRange,
    uniforms: [wgpu::Buffer; 2],
    stats_groups: (u32, u32),
    normalize_groups: (u32, u32),
}

/// `(N, C, S)` view of an `(N, C, *)` shape, with `M = N·S` and the element count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BnDims {
    pub n: u64,
    pub c: u64,
    pub s: u64,
    pub m: u64,
    pub total: u64,
}

impl BnDims {
    pub(crate) fn of(op: &'static str, shape: &[usize], num_features: usize) -> Result<Self> {
        if shape.len() < 2 {
            return Err(Error::shape(op, "input", shape, "rank >= 2: (N, C, *)"));
        }
        if shape[1] != num_features {
            return Err(Error::shape(
                op,
                "input",
                shape,
                format!("C = shape[1] = num_features = {num_features}"),
            ));
        }
        let n = shape[0] as u64;
        let c = shape[1] as u64;
        let s = shape[2..].iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        let total = s.and_then(|s| s.checked_mul(n)).and_then(|ns| ns.checked_mul(c));
        let (Some(s), Some(total)) = (s, total) else {
            return Err(Error::shape(
                op,
                "input",
                shape,
                "an element count that fits in 64 bits",
            ));
        };
        if total == 0 {
            return Err(Error::shape(
                op,
                "input",
                shape,
                "no zero-sized dimension (empty tensors are not supported)",
            ));
        }
        if total > MAX_ELEMENTS {
            return Err(Error::ExceedsLimit {
                op,
                what: "input elements",
                value: total,
                limit: MAX_ELEMENTS,
                limit_name: "2^31 elements per call (u32 indexing)",
            });
        }
        Ok(Self {
            n,
            c,
            s,
            m: n * s,
            total,
        })
    }
}

/// The buffers of one BatchNorm forward. Slices may have offsets (aligned to
/// `min_storage_buffer_offset_alignment`) and may be larger than needed. `x` and `y` are stored
/// as the kernel's [`Storage`]; everything else is f32.
#[derive(Clone, Debug)]
pub struct BatchNormBuffers<'a> {
    /// Input, `(N, C, *)`, read only. Must not share a buffer with `y`.
    pub x: wgpu::BufferSlice<'a>,
    /// Output, same shape as `x`.
    pub y: wgpu::BufferSlice<'a>,
    /// γ, `(C)`. Required when `affine`, ignored otherwise.
    pub weight: Option<wgpu::BufferSlice<'a>>,
    /// β, `(C)`. Required when `affine`, ignored otherwise.
    pub bias: Option<wgpu::BufferSlice<'a>>,
    /// Running mean, `(C)`, updated in training. Required when `track_running_stats`.
    pub running_mean: Option<wgpu::BufferSlice<'a>>,
    /// Running (unbiased) variance, `(C)`, updated in training. Required when tracking.
    pub running_var: Option<wgpu::BufferSlice<'a>>,
    /// `num_batches_tracked` as a little-endian u64 in two u32 words (8 bytes), incremented
    /// by every training call. Required when tracking.
    pub num_batches_tracked: Option<wgpu::BufferSlice<'a>>,
    /// Output `(C)`: the mean this call normalized with (batch mean when batch statistics are
    /// used, running mean in eval mode). Backward reads it.
    pub save_mean: wgpu::BufferSlice<'a>,
    /// Output `(C)`: the `1/sqrt(var + eps)` this call normalized with (biased batch variance,
    /// or the running variance in eval mode).
    pub save_invstd: wgpu::BufferSlice<'a>,
    /// Generator state (16 bytes, see [`rng_state_bytes`](crate::kernels::dropout::rng_state_bytes));
    /// required when the plan fuses a dropout, ignored otherwise. Not advanced.
    pub rng: Option<wgpu::BufferSlice<'a>>,
}

/// A BatchNorm forward for one input shape and configuration: owns its uniform parameters and
/// stats scratch, and encodes into any encoder on any matching buffers.
#[derive(Debug)]
pub struct BatchNormPlan {
    kernel: BatchNormKernel,
    config: BatchNormConfig,
    shape: Vec<usize>,
    dims: BnDims,
    limits: BindLimits,
    dropout: Option<DropoutConfig>,
    split: ReduceSplit,
    /// Sample ranges, one per storage binding's worth of samples.
    ranges: Vec<BnRange>,
    partials: wgpu::Buffer,
    partials_bytes: u64,
    /// Per channel (K, mean − K, invstd·γ, β): the shift the statistics were taken around and
    /// the normalize coefficients, written by the finalize passes.
    centre: wgpu::Buffer,
    finalize_groups: (u32, u32),
    /// The finalize takes one invocation per channel (see [`serial_finalize`]).
    serial_finalize: bool,
    eval_groups: (u32, u32),
    /// S % 4 == 0 and S ≥ 4·run: the normalize pass takes its aligned entry points, where every
    /// quad lies in one channel and a run enters at most one next channel.
    aligned: bool,
    /// How a call with batch statistics runs (see [`BatchNormPath`]).
    path: BatchNormPath,
    channel_groups: (u32, u32),
}

impl BatchNormPlan {
    /// How the activations this plan reads and writes are stored (its kernel's storage).
    pub fn storage(&self) -> Storage {
        self.kernel.storage
    }

    /// The input shape this plan was built for.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The configuration this plan was built for.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// The dropout fused into the normalize pass, if any.
    pub fn dropout(&self) -> Option<&DropoutConfig> {
        self.dropout.as_ref()
    }

    /// Sample ranges each call dispatches: 1 unless the input exceeds one storage binding.
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }

    /// How the statistics pass splits each channel.
    pub fn split(&self) -> ReduceSplit {
        self.split
    }

    /// Whether calls with batch statistics take the one-pass-per-channel forward (see
    /// [`BatchNormPlanOptions::channel_pass`]) where x and y bind as 16-byte vectors.
    pub fn channel_pass(&self) -> bool {
        self.path == BatchNormPath::ChannelPass
    }

    /// Whether a call in this mode normalizes with batch statistics (training, or no running
    /// statistics to use) rather than the running ones.
    pub fn uses_batch_stats(&self, training: bool) -> bool {
        training || !self.config.track_running_stats
    }

    /// Checks `buffers` for this plan and mode without recording anything.
    pub fn validate(&self, training: bool, b: &BatchNormBuffers<'_>) -> Result<()> {
        self.args(training, b).map(|_| ())
    }

    /// Checks every buffer of a call and returns them as the call's arguments. The normalize
    /// pass reads `x` after the statistics pass, so nothing runs in place.
    fn args<'s, 'a>(&self, training: bool, b: &'s BatchNormBuffers<'a>) -> Result<CallArgs<'s, 'a>> {
        if self.uses_batch_stats(training) && self.dims.m == 1 {
            return Err(Error::shape(
                OP,
                "input",
                &self.shape,
                "more than 1 value per channel when using batch statistics (N·∏spatial > 1)",
            ));
        }
        self.buffer_args(b)
    }

    /// [`Self::args`] without the check of one value per channel (SyncBatchNorm's steps,
    /// where the count that matters is every rank's).
    fn buffer_args<'s, 'a>(&self, b: &'s BatchNormBuffers<'a>) -> Result<CallArgs<'s, 'a>> {
        let x_bytes = self.dims.total * self.kernel.storage.element_bytes();
        let c_bytes = self.dims.c * 4;
        let mut args = CallArgs::new(OP, &self.limits);
        args.read_ranged("x", &b.x, x_bytes)?;
        args.write_ranged("y", &b.y, x_bytes)?;
        args.write("save_mean", &b.save_mean, c_bytes)?;
        args.write("save_invstd", &b.save_invstd, c_bytes)?;
        if self.config.affine {
            let w = b.weight.as_ref().ok_or_else(|| missing("weight", "affine"))?;
            let bi = b.bias.as_ref().ok_or_else(|| missing("bias", "affine"))?;
            args.read("weight", w, c_bytes)?;
            args.read("bias", bi, c_bytes)?;
        }
        if self.config.track_running_stats {
            let rm = b
                .running_mean
                .as_ref()
                .ok_or_else(|| missing("running_mean", "track_running_stats"))?;
            let rv = b
                .running_var
                .as_ref()
                .ok_or_else(|| missing("running_var", "track_running_stats"))?;
            let nbt = b
                .num_batches_tracked
                .as_ref()
                .ok_or_else(|| missing("num_batches_tracked", "track_running_stats"))?;
            // Written in training; bound writable in eval too.
            args.write("running_mean", rm, c_bytes)?;
            args.write("running_var", rv, c_bytes)?;
            args.write("num_batches_tracked", nbt, 8)?;
        }
        if self.dropout.is_some() {
            let rng = b
                .rng
                .as_ref()
                .ok_or_else(|| missing("rng", "the plan fuses a dropout"))?;
            args.read("rng", rng, RNG_STATE_BYTES)?;
        }
        args.check_aliasing()?;
        Ok(args)
    }

    /// Records one BatchNorm forward into `encoder`. `training` selects batch statistics and
    /// the running-statistics update (PyTorch's `module.training`). Checks everything first:
    /// on error nothing is recorded.
    pub fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        training: bool,
        b: &BatchNormBuffers<'_>,
    ) -> Result<()> {
        check_device(OP, &self.kernel.device, device)?;
        let args = self.args(training, b)?;
        args.record(device, encoder, "batch_norm forward", || {
            self.dispatches(device, training, b, Step::Whole)
        })
    }

    /// SyncBatchNorm, step 1 of a training call: records the statistics pass and copies each
    /// channel's local `(K, mean − K, M2, count)` (4 f32, K a value of this slice's channel)
    /// into `export` (`COPY_DST`, [`Self::sync_bytes`] bytes at a 4-byte aligned offset). The
    /// caller reads it back, merges every rank's (see [`crate::sync`]) and writes the result
    /// for [`Self::encode_sync_finalize`]. Changes no running statistics or counter. Not for
    /// plans with a fused dropout.
    pub fn encode_sync_stats(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        b: &BatchNormBuffers<'_>,
        export: &wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        check_device(OP, &self.kernel.device, device)?;
        self.check_sync()?;
        let args = self.buffer_args(b)?;
        crate::kernels::check_copy(OP, "export", export, self.sync_bytes(), wgpu::BufferUsages::COPY_DST)?;
        args.record(device, encoder, "batch_norm sync statistics", || {
            self.dispatches(device, true, b, Step::SyncStats)
        })?;
        encoder.copy_buffer_to_buffer(&self.centre, 0, export.buffer(), export.offset(), self.sync_bytes());
        Ok(())
    }

    /// SyncBatchNorm, step 3: copies `merged` (`COPY_SRC`, 2·C·4 f32: per channel `(K,
    /// mean − K, M2, count)` with K this rank's, from the export, and mean, M2 and count over
    /// every rank; then per channel `(mean, 0, 0, 0)`) into the plan, then records `num_batches_tracked += 1`, the finalize (saved statistics,
    /// running statistics with the global count, coefficients) and the normalize pass.
    pub fn encode_sync_finalize(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        b: &BatchNormBuffers<'_>,
        merged: &wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        check_device(OP, &self.kernel.device, device)?;
        self.check_sync()?;
        let args = self.buffer_args(b)?;
        crate::kernels::check_copy(
            OP,
            "merged",
            merged,
            2 * self.sync_bytes(),
            wgpu::BufferUsages::COPY_SRC,
        )?;
        // The copy only fills the plan's scratch: harmless if recording then fails.
        encoder.copy_buffer_to_buffer(merged.buffer(), merged.offset(), &self.centre, 0, 2 * self.sync_bytes());
        args.record(device, encoder, "batch_norm sync finalize", || {
            self.dispatches(device, true, b, Step::SyncFinalize)
        })
    }

    /// Bytes of the per-channel statistics a SyncBatchNorm step exports: C·16 (it imports
    /// twice as many).
    pub fn sync_bytes(&self) -> u64 {
        self.dims.c * 16
    }

    fn check_sync(&self) -> Result<()> {
        if self.dropout.is_some() {
            return Err(Error::invalid(OP, "a SyncBatchNorm step cannot fuse a dropout"));
        }
        Ok(())
    }

    /// The dispatches of one call (or of one step of a split call), with their bind groups.
    fn dispatches<'p>(
        &'p self,
        device: &wgpu::Device,
        training: bool,
        b: &BatchNormBuffers<'_>,
        step: Step,
    ) -> Result<Vec<Dispatch<'p>>> {
        let k = &self.kernel;
        let sample_bytes = self.dims.c * self.dims.s * k.storage.element_bytes();
        let c_bytes = self.dims.c * 4;
        let ph = &k.placeholders;
        let affine = self.config.affine;
        let tracking = self.config.track_running_stats;
        let weight = binding_or(affine, &b.weight, &ph[0], c_bytes);
        let bias = binding_or(affine, &b.bias, &ph[1], c_bytes);
        let running_mean = binding_or(tracking, &b.running_mean, &ph[2], c_bytes);
        let running_var = binding_or(tracking, &b.running_var, &ph[3], c_bytes);
        let nbt = binding_or(tracking, &b.num_batches_tracked, &ph[4], 8);
        let save_mean = binding(&b.save_mean, c_bytes);
        let save_invstd = binding(&b.save_invstd, c_bytes);
        let centre = self.centre.as_entire_binding();
        let partials = wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.partials,
            offset: 0,
            size: std::num::NonZeroU64::new(self.partials_bytes),
        });
        let range_bytes = |c: &BnRange| (c.range.start * sample_bytes, c.range.count * sample_bytes);
        // The whole-call passes (finalize) take the first range's uniform: it holds the totals.
        let uniform = self.ranges[0].uniforms[usize::from(training)].as_entire_binding();

        let batch_stats = self.uses_batch_stats(training);
        let drop = self.dropout.is_some() && b.rng.is_some();
        let rng = match (&self.dropout, &b.rng) {
            (Some(_), Some(rng)) => binding(rng, RNG_STATE_BYTES),
            _ => ph[5].as_entire_binding(),
        };
        let channel_pass = self.path == BatchNormPath::ChannelPass && batch_stats && step == Step::Whole;
        if let (Some(channel), true, [c]) = (&k.channel, channel_pass, self.ranges.as_slice()) {
            let (at, len) = range_bytes(c);
            if vec4_bindable(&[&b.x, &b.y], at, len) {
                let pass = channel.get("batch_norm_channel_forward", &[("DROPOUT", drop.into())])?;
                let entries = [
                    (0, c.uniforms[usize::from(training)].as_entire_binding()),
                    (1, binding_at(&b.x, at, len)),
                    (2, binding_at(&b.y, at, len)),
                    (3, weight),
                    (4, bias),
                    (5, running_mean),
                    (6, running_var),
                    (7, nbt),
                    (8, save_mean),
                    (9, save_invstd),
                    (11, rng),
                ];
                let group = bind_group(device, "batch_norm_channel_forward", pass, &entries);
                return Ok(vec![(pass, group, self.channel_groups)]);
            }
        }
        let mut groups = Vec::new();
        let serial = self.split.serial();
        let finalize = k.pipelines.get(
            if self.serial_finalize {
                "batch_norm_finalize_serial"
            } else {
                "batch_norm_finalize"
            },
            &[],
        )?;
        if step == Step::SyncFinalize {
            let count = k.pipelines.get("batch_norm_count", &[])?;
            let entries = [(0, uniform.clone()), (7, nbt.clone()), (10, partials.clone())];
            groups.push((count, bind_group(device, "batch_norm_count", count, &entries), (1, 1)));
            let merged = k.pipelines.get("batch_norm_finalize_merged", &[])?;
            let entries = [
                (0, uniform.clone()),
                (3, weight.clone()),
                (4, bias.clone()),
                (5, running_mean.clone()),
                (6, running_var.clone()),
                (8, save_mean.clone()),
                (9, save_invstd.clone()),
                (10, partials.clone()),
                (12, centre.clone()),
            ];
            groups.push((
                merged,
                bind_group(device, "batch_norm_finalize_merged", merged, &entries),
                self.eval_groups,
            ));
        } else if batch_stats {
            // A split step's statistics pass does not count (batch_norm_count does, later).
            let stats_uniform = usize::from(training && step == Step::Whole);
            for c in &self.ranges {
                let (at, len) = range_bytes(c);
                let pipelines = match &k.pipelines_vec4 {
                    Some(v) if self.dims.s.is_multiple_of(4) && vec4_bindable(&[&b.x], at, len) => v,
                    _ => &k.pipelines,
                };
                let stats = pipelines.get(
                    if serial {
                        "batch_norm_stats_serial"
                    } else {
                        "batch_norm_stats"
                    },
                    &[],
                )?;
                let entries = [
                    (0, c.uniforms[stats_uniform].as_entire_binding()),
                    (1, binding_at(&b.x, at, len)),
                    (7, nbt.clone()),
                    (10, partials.clone()),
                    (12, centre.clone()),
                ];
                groups.push((
                    stats,
                    bind_group(device, "batch_norm_stats", stats, &entries),
                    c.stats_groups,
                ));
            }
            if step == Step::SyncStats {
                let export = k.pipelines.get("batch_norm_export", &[])?;
                let entries = [(0, uniform.clone()), (10, partials.clone()), (12, centre.clone())];
                groups.push((
                    export,
                    bind_group(device, "batch_norm_export", export, &entries),
                    fold_workgroups(OP, self.dims.c, self.limits.max_workgroups_per_dim)?,
                ));
                return Ok(groups);
            }
            groups.push((
                finalize,
                bind_group(
                    device,
                    "batch_norm_finalize",
                    finalize,
                    &[
                        (0, uniform.clone()),
                        (5, running_mean.clone()),
                        (6, running_var.clone()),
                        (3, weight.clone()),
                        (4, bias.clone()),
                        (8, save_mean.clone()),
                        (9, save_invstd.clone()),
                        (10, partials.clone()),
                        (12, centre.clone()),
                    ],
                ),
                self.finalize_groups,
            ));
        } else {
            let finalize_eval = k.pipelines.get("batch_norm_finalize_eval", &[])?;
            groups.push((
                finalize_eval,
                bind_group(
                    device,
                    "batch_norm_finalize_eval",
                    finalize_eval,
                    &[
                        (0, uniform.clone()),
                        (3, weight.clone()),
                        (4, bias.clone()),
                        (5, running_mean.clone()),
                        (6, running_var.clone()),
                        (8, save_mean.clone()),
                        (9, save_invstd.clone()),
                        (12, centre.clone()),
                    ],
                ),
                self.eval_groups,
            ));
        }
        for c in &self.ranges {
            let (at, len) = range_bytes(c);
            let pipelines = match &k.pipelines_vec4 {
                Some(v) if vec4_bindable(&[&b.x, &b.y], at, len) => v,
                _ => &k.pipelines,
            };
            let normalize = pipelines.get(
                "batch_norm_normalize",
                &[("DROPOUT", drop.into()), ("ALIGNED", self.aligned.into())],
            )?;
            let entries = [
                (0, c.uniforms[usize::from(training)].as_entire_binding()),
                (1, binding_at(&b.x, at, len)),
                (2, binding_at(&b.y, at, len)),
                (11, rng.clone()),
                (12, centre.clone()),
            ];
            groups.push((
                normalize,
                bind_group(device, "batch_norm_normalize", normalize, &entries),
                c.normalize_groups,
            ));
        }

        // batch_norm_finalize updates running statistics exactly when FLAG_TRACK is set: with tracking
        // it only runs in training mode (eval uses batch_norm_finalize_eval), after the stats pass that
        // incremented num_batches_tracked (FLAG_COUNT).
        Ok(groups)
    }
}

/// Which part of a call `dispatches` records: all of it, or one step of SyncBatchNorm's split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Whole,
    SyncStats,
    SyncFinalize,
}

fn missing(what: &'static str, because: &str) -> Error {
    Error::Buffer {
        op: OP,
        what,
        reason: format!("is required when {because} is set"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_reduce_split_is_workgroups_on_gpus_and_invocations_filling_threads_on_cpus() {
        for (c, m) in [(1, 1), (64, 6272), (1, 1 << 24)] {
            for gpu in [wgpu::DeviceType::DiscreteGpu, wgpu::DeviceType::IntegratedGpu] {
                assert_eq!(
                    default_reduce_split(gpu, c, m, 2),
                    ReduceSplit::Workgroup {
                        chunk: DEFAULT_STATS_CHUNK
                    }
                );
            }
        }
        let cpu = |c, m, threads| match default_reduce_split(wgpu::DeviceType::Cpu, c, m, threads) {
            ReduceSplit::Invocation { chunk } => chunk,
            other => panic!("{other:?} on a CPU adapter"),
        };
        assert_eq!(cpu(64, 6272, 2), 392); // 8x64x28x28: 16 chunks per channel, 4 workgroups
        assert_eq!(cpu(64, 401_408, 2), 25_088); // 32x64x112x112
        assert_eq!(cpu(2048, 1568, 2), 1568); // 32x2048x7x7: a channel per invocation
        assert_eq!(cpu(64, 6272, 16), MIN_INVOCATION_CHUNK); // 32 workgroups wanted, 25 given
        assert_eq!(cpu(64, 401_408, 16), 3136); // 32 workgroups for 16 threads
        assert_eq!(cpu(1, 10, 2), MIN_INVOCATION_CHUNK);
        for (c, m) in [(1u64, 1u64), (3, 257), (64, 6272), (7, 40_001), (1, 1 << 24)] {
            let chunk = cpu(c, m, 2);
            assert_eq!(chunk % 4, 0, "chunks are whole quads (c = {c}, m = {m})");
            assert!(chunk >= MIN_INVOCATION_CHUNK);
        }
    }
}
