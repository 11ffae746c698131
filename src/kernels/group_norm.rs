//! GroupNorm (and InstanceNorm, `G = C`), forward and backward, low level:
//! [`GroupNormKernel`] / [`GroupNormPlan`] and [`GroupNormBackwardKernel`] /
//! [`GroupNormBackwardPlan`], recording into a caller's encoder. The math and the passes are in
//! `shaders/group_norm/forward.wgsl` and `backward.wgsl`.
//!
//! GroupNorm is BatchNorm's split reduction on other views of the same memory. A group
//! (sample n, group g) is `L = C/G·S` contiguous elements, so on the `(1, N·G, L)` view it is a
//! BatchNorm channel: BatchNorm's statistics pass cuts it into chunks over as many workgroups as
//! its size needs (1 × 3 × 512 × 512 with G = 1 still spreads over 192 workgroups on a GPU).
//! A (sample, channel) is a BatchNorm channel of the `(1, N·C, S)` view, whose normalize and dx
//! passes then run unchanged with per-(n, c) coefficients. Only the finalize passes, which
//! turn per-group sums into per-channel coefficients, are GroupNorm's own.
//!
//! | dispatch                        | workgroups          | reads                   | writes                       |
//! |---------------------------------|---------------------|-------------------------|------------------------------|
//! | `batch_norm_stats`              | N·G · chunks        | x                       | partials (mean − K, M2, n, K) |
//! | `group_norm_finalize`           | N·G                 | partials, γ, β          | mean, rstd (N, G); coefficients (N, C) |
//! | `batch_norm_normalize`          | ⌈N·C·S / (1024·run)⌉ | x, coefficients         | y                            |
//! | `batch_norm_backward_reduce`    | N·C · chunks        | x, dy, mean             | partial sums                 |
//! | `group_norm_backward_finalize`  | N·G                 | partial sums, γ, rstd   | per-(n, c) Σdy·x̂, Σdy; dx coefficients |
//! | `group_norm_backward_params`    | ⌈C / 64⌉            | per-(n, c) sums         | dγ, dβ (affine only)         |
//! | `batch_norm_backward_dx`        | ⌈N·C·S / (1024·run)⌉ | x, dy, coefficients     | dx                           |
//!
//! Traffic: forward reads x twice and writes y; backward reads x and dy twice and writes dx,
//! as BatchNorm's. The reductions take [`ReduceSplit::Invocation`] on CPU adapters (the
//! BatchNorm `_serial` entry points), as BatchNorm's do.

use crate::context::Kernel;
use crate::error::{Error, Result};
use crate::grad::Accumulate;
use crate::kernels::batch_norm::{
    default_normalize_run, finalize_groups, reduce_groups, runs_align, serial_finalize, BnDims, BnParams, ReduceSplit,
    MAX_NORMALIZE_RUN, NORMALIZE_FLAGS,
};
use crate::kernels::batch_norm_backward::{BnBackwardParams, DX_ALIGNED_FLAGS, DX_FLAGS, FLAG_ACCUM_DX, REDUCE_FLAGS};
use crate::kernels::norm_configs::{GroupNormConfig, GroupNormDims};
use crate::kernels::{
    bind_group, bind_ranges, binding, binding_at, binding_or, check_device, fold_workgroups, gcd, placeholder,
    shader_module, uniform_buffer, vec4_bindable, vec4_module, BindLimits, BindRange, CallArgs, Dispatch, FastDiv,
    Pipelines, Storage,
};

/// Entry points of `shaders/group_norm/forward.wgsl` (the rest of the forward is BatchNorm's).
pub(crate) const FORWARD_ENTRY_POINTS: &[&str] = &["group_norm_finalize"];
/// Entry points of `shaders/group_norm/backward.wgsl`.
pub(crate) const BACKWARD_ENTRY_POINTS: &[&str] = &["group_norm_backward_finalize", "group_norm_backward_params"];

const OP: &str = "group_norm";
const OP_BACKWARD: &str = "group_norm backward";
const WORKGROUP: u64 = 256;
/// Workgroup size of the one-invocation-per-item passes (`group_norm_backward_params`, the
/// `_serial` finalizes).
const CHANNEL_WORKGROUP: u64 = 64;
const FLAG_AFFINE: u32 = 1;
const FLAG_ACCUM_PARAMS: u32 = 2;

/// Mirrors `struct Params` in `shaders/group_norm/params.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct GnParams {
    groups: u32,
    g: u32,
    group_chans: u32,
    parts: u32,
    count: u32,
    flags: u32,
    eps: f32,
    n: u32,
    c: u32,
    sums_base: u32,
    _pad: [u32; 2],
}
const _: () = assert!(std::mem::size_of::<GnParams>() == 48);

/// Geometry overrides of a GroupNorm plan, forward or backward. `Default` leaves every choice
/// to the device's policy; results agree within rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupNormPlanOptions {
    /// How the reduction splits each group (forward: a group's `L = C/G·∏spatial` elements;
    /// backward: each (sample, channel)'s `∏spatial`). `None`: [`crate::tuning::default_reduce_split`].
    pub split: Option<ReduceSplit>,
    /// Quads each invocation of the element-wise pass (normalize, dx) takes, 1 to
    /// [`MAX_NORMALIZE_RUN`]. `None`: [`default_normalize_run`] for the adapter type.
    pub run: Option<u32>,
}

/// The sizes a GroupNorm plan works with (u64, checked by [`GroupNormConfig::dims`]).
#[derive(Clone, Copy, Debug)]
struct Sizes {
    n: u64,
    c: u64,
    s: u64,
    /// Groups per sample G.
    g: u64,
    /// Channels per group C/G.
    cpg: u64,
    /// Elements per group L.
    l: u64,
    total: u64,
}

impl Sizes {
    fn of(d: &GroupNormDims) -> Self {
        let (n, g, cpg, s) = (
            d.n as u64,
            d.groups as u64,
            d.channels_per_group as u64,
            d.spatial as u64,
        );
        Self {
            n,
            c: g * cpg,
            s,
            g,
            cpg,
            l: cpg * s,
            total: n * g * cpg * s,
        }
    }

    fn groups(&self) -> u64 {
        self.n * self.g
    }
}

fn resolve_run(op: &'static str, device: &wgpu::Device, run: Option<u32>) -> Result<u32> {
    match run {
        Some(run) if (1..=MAX_NORMALIZE_RUN).contains(&run) => Ok(run),
        Some(run) => Err(Error::invalid(
            op,
            format!("run must be 1..={MAX_NORMALIZE_RUN}, got {run}"),
        )),
        None => Ok(default_normalize_run(device.adapter_info().device_type)),
    }
}

/// Ranges of whole groups that each fit in one storage binding, starting at multiples of 4
/// elements (the element-wise passes take quads).
fn group_ranges(op: &'static str, z: &Sizes, storage: Storage, limits: &BindLimits) -> Result<Vec<BindRange>> {
    bind_ranges(
        op,
        "one group (C/G·∏spatial elements) in bytes",
        z.groups(),
        z.l * storage.element_bytes(),
        limits,
        4 / gcd(z.l, 4),
    )
}

fn scratch(device: &wgpu::Device, label: &str, bytes: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: bytes,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    })
}

fn missing(op: &'static str, what: &'static str) -> Error {
    Error::Buffer {
        op,
        what,
        reason: "is required when affine is set".into(),
    }
}

/// Compiled GroupNorm forward pipelines for one device and activation storage: BatchNorm's
/// statistics and normalize entry points and GroupNorm's finalize.
#[derive(Clone, Debug)]
pub struct GroupNormKernel {
    device: wgpu::Device,
    storage: Storage,
    pipelines: Pipelines,
    /// The statistics and normalize passes from the vec4 variant (f32 only).
    pipelines_vec4: Option<Pipelines>,
    /// Stand-ins for γ, β, num_batches_tracked (BatchNorm's stats layout holds it) and the
    /// generator state (its normalize layout holds it).
    placeholders: [wgpu::Buffer; 4],
}

impl Kernel for GroupNormKernel {
    fn build(device: &wgpu::Device, storage: Storage) -> Self {
        let per_range = |module: &wgpu::ShaderModule, vec4: bool| {
            let mut p = Pipelines::default();
            p.add_all(device, module, "batch_norm_stats", &[]);
            p.add(device, module, "batch_norm_normalize", &NORMALIZE_FLAGS, |f| !f[0]);
            crate::kernels::cpu::add_group_norm_serial(&mut p, device, storage, vec4, true);
            p
        };
        let bn = shader_module(device, "batch_norm/forward.wgsl", storage, false);
        let mut pipelines = per_range(&bn, false);
        let own = shader_module(device, "group_norm/forward.wgsl", storage, false);
        pipelines.add_all(device, &own, FORWARD_ENTRY_POINTS[0], &[]);
        Self {
            device: device.clone(),
            storage,
            pipelines,
            pipelines_vec4: vec4_module(device, "batch_norm/forward.wgsl", storage).map(|m| per_range(&m, true)),
            placeholders: std::array::from_fn(|_| placeholder(device, "group_norm placeholder")),
        }
    }
}

storage_constructors!(GroupNormKernel, "x, y");

/// The buffers of one GroupNorm forward. `x` and `y` are stored as the kernel's [`Storage`];
/// everything else is f32. Slices may have offsets aligned to
/// `min_storage_buffer_offset_alignment`.
#[derive(Clone, Debug)]
pub struct GroupNormBuffers<'a> {
    /// Input `(N, C, *)`, read only.
    pub x: wgpu::BufferSlice<'a>,
    /// Output, same shape.
    pub y: wgpu::BufferSlice<'a>,
    /// γ `(C)`; required with `affine`.
    pub weight: Option<wgpu::BufferSlice<'a>>,
    /// β `(C)`; required with `affine`.
    pub bias: Option<wgpu::BufferSlice<'a>>,
    /// Output `(N, G)`: each group's mean, for backward.
    pub mean: wgpu::BufferSlice<'a>,
    /// Output `(N, G)`: each group's `1/sqrt(var + eps)` (biased variance), for backward.
    pub rstd: wgpu::BufferSlice<'a>,
}

/// One range of whole groups: the BatchNorm views' uniforms and workgroup counts.
#[derive(Debug)]
struct GnRange {
    range: BindRange,
    /// `(1, groups in range, L)` for the statistics pass.
    stats_uniform: wgpu::Buffer,
    /// `(1, channels in range, S)` for the normalize pass.
    normalize_uniform: wgpu::Buffer,
    stats_groups: (u32, u32),
    normalize_groups: (u32, u32),
}

/// A GroupNorm forward for one input shape and configuration: owns its uniforms and scratch
/// (chunk partials, per-(n, c) coefficients) and encodes into any encoder.
#[derive(Debug)]
pub struct GroupNormPlan {
    kernel: GroupNormKernel,
    config: GroupNormConfig,
    shape: Vec<usize>,
    sizes: Sizes,
    limits: BindLimits,
    split: ReduceSplit,
    ranges: Vec<GnRange>,
    partials: wgpu::Buffer,
    coef: wgpu::Buffer,
    finalize_uniform: wgpu::Buffer,
    finalize_groups: (u32, u32),
    /// One invocation per group finalizes (see [`serial_finalize`]).
    serial_finalize: bool,
    aligned: bool,
}

impl GroupNormKernel {
    /// A plan for inputs of `shape` = `(N, C, *)` with the device's default geometry.
    pub fn plan(&self, device: &wgpu::Device, shape: &[usize], config: &GroupNormConfig) -> Result<GroupNormPlan> {
        self.plan_with(device, shape, config, &GroupNormPlanOptions::default())
    }

    /// A plan with geometry overrides ([`GroupNormPlanOptions`]).
    pub fn plan_with(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &GroupNormConfig,
        options: &GroupNormPlanOptions,
    ) -> Result<GroupNormPlan> {
        check_device(OP, &self.device, device)?;
        let z = Sizes::of(&config.dims(shape)?);
        let view = BnDims {
            n: 1,
            c: z.groups(),
            s: z.l,
            m: z.l,
            total: z.total,
        };
        let split = ReduceSplit::resolve(options.split, OP, device, &view)?;
        let run = resolve_run(OP, device, options.run)?;
        let limits = BindLimits::of(device);
        let max = limits.max_workgroups_per_dim;
        let ranges = group_ranges(OP, &z, self.storage, &limits)?;
        let chunks = z.l.div_ceil(u64::from(split.chunk()));
        let partials_bytes = z.groups() * chunks * 16;
        limits.check_size(
            OP,
            "stats partials in bytes (use a larger ReduceSplit chunk)",
            partials_bytes,
        )?;
        let coef_bytes = z.n * z.c * 16;
        limits.check_size(OP, "per-(sample, channel) coefficients in bytes", coef_bytes)?;
        let div_s = FastDiv::new(z.s).words();
        let mut per_range = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let chans = r.count * z.cpg;
            let common = BnParams {
                n: 1,
                c: r.count as u32,
                s: z.l as u32,
                m: z.l as u32,
                chunk_len: split.chunk(),
                chunks: chunks as u32,
                flags: 0,
                total: (r.count * z.l) as u32,
                eps: config.eps,
                momentum: 0.0,
                drop_threshold: 0,
                drop_flags: 0,
                drop_scale: 1.0,
                part_base: (r.start * chunks) as u32,
                parts: chunks as u32,
                m_all: z.l as u32,
                elem_base: (r.start * z.l) as u32,
                first: 1,
                div_s: FastDiv::new(z.l).words(),
                div_c: FastDiv::new(r.count).words(),
                run,
                chan_base: 0,
            };
            let normalize = BnParams {
                c: chans as u32,
                s: z.s as u32,
                m: z.s as u32,
                div_s,
                div_c: FastDiv::new(chans).words(),
                chan_base: (r.start * z.cpg) as u32,
                ..common
            };
            per_range.push(GnRange {
                range: *r,
                stats_uniform: uniform_buffer(device, "group_norm stats params", &common),
                normalize_uniform: uniform_buffer(device, "group_norm normalize params", &normalize),
                stats_groups: reduce_groups(OP, split, r.count * chunks, max)?,
                normalize_groups: fold_workgroups(OP, (r.count * z.l).div_ceil(WORKGROUP * 4 * u64::from(run)), max)?,
            });
        }
        let finalize = GnParams {
            groups: z.groups() as u32,
            g: z.g as u32,
            group_chans: z.cpg as u32,
            parts: chunks as u32,
            count: z.l as u32,
            flags: if config.affine { FLAG_AFFINE } else { 0 },
            eps: config.eps,
            n: z.n as u32,
            c: z.c as u32,
            sums_base: 0,
            _pad: [0; 2],
        };
        Ok(GroupNormPlan {
            kernel: self.clone(),
            config: config.clone(),
            shape: shape.to_vec(),
            sizes: z,
            limits,
            split,
            ranges: per_range,
            partials: scratch(device, "group_norm partials", partials_bytes),
            coef: scratch(device, "group_norm coefficients", coef_bytes),
            finalize_uniform: uniform_buffer(device, "group_norm finalize params", &finalize),
            finalize_groups: finalize_groups(OP, serial_finalize(split, chunks), z.groups(), max)?,
            serial_finalize: serial_finalize(split, chunks),
            aligned: runs_align(z.s, run),
        })
    }
}

impl GroupNormPlan {
    /// The input shape this plan was built for.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The configuration this plan was built for.
    pub fn config(&self) -> &GroupNormConfig {
        &self.config
    }

    /// How the activations are stored (the kernel's storage).
    pub fn storage(&self) -> Storage {
        self.kernel.storage
    }

    /// Ranges of whole groups each call dispatches: 1 unless the input exceeds one storage
    /// binding.
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }

    /// How the statistics pass splits each group.
    pub fn split(&self) -> ReduceSplit {
        self.split
    }

    /// Checks `buffers` without recording anything.
    pub fn validate(&self, b: &GroupNormBuffers<'_>) -> Result<()> {
        self.args(b).map(|_| ())
    }

    fn args<'s, 'a>(&self, b: &'s GroupNormBuffers<'a>) -> Result<CallArgs<'s, 'a>> {
        let z = &self.sizes;
        let x_bytes = z.total * self.kernel.storage.element_bytes();
        let mut args = CallArgs::new(OP, &self.limits);
        args.read_ranged("x", &b.x, x_bytes)?;
        args.write_ranged("y", &b.y, x_bytes)?;
        args.write("mean", &b.mean, z.groups() * 4)?;
        args.write("rstd", &b.rstd, z.groups() * 4)?;
        if self.config.affine {
            args.read(
                "weight",
                b.weight.as_ref().ok_or_else(|| missing(OP, "weight"))?,
                z.c * 4,
            )?;
            args.read("bias", b.bias.as_ref().ok_or_else(|| missing(OP, "bias"))?, z.c * 4)?;
        }
        args.check_aliasing()?;
        Ok(args)
    }

    /// Records one GroupNorm forward into `encoder`. Checks everything first: on error nothing
    /// is recorded.
    pub fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        b: &GroupNormBuffers<'_>,
    ) -> Result<()> {
        check_device(OP, &self.kernel.device, device)?;
        let args = self.args(b)?;
        args.record(device, encoder, "group_norm forward", || self.dispatches(device, b))
    }

    fn dispatches<'p>(&'p self, device: &wgpu::Device, b: &GroupNormBuffers<'_>) -> Result<Vec<Dispatch<'p>>> {
        let k = &self.kernel;
        let z = &self.sizes;
        let ph = &k.placeholders;
        let group_bytes = z.l * k.storage.element_bytes();
        let c_bytes = z.c * 4;
        let affine = self.config.affine;
        let partials = self.partials.as_entire_binding();
        let coef = self.coef.as_entire_binding();
        let serial = self.split.serial();
        let mut out = Vec::with_capacity(2 * self.ranges.len() + 1);
        for r in &self.ranges {
            let (at, len) = (r.range.start * group_bytes, r.range.count * group_bytes);
            let pipelines = match &k.pipelines_vec4 {
                Some(v) if z.l.is_multiple_of(4) && vec4_bindable(&[&b.x], at, len) => v,
                _ => &k.pipelines,
            };
            let entry = if serial {
                "batch_norm_stats_serial"
            } else {
                "batch_norm_stats"
            };
            let stats = pipelines.get(entry, &[])?;
            let entries = [
                (0, r.stats_uniform.as_entire_binding()),
                (1, binding_at(&b.x, at, len)),
                (7, ph[2].as_entire_binding()),
                (10, partials.clone()),
                (12, coef.clone()),
            ];
            out.push((
                stats,
                bind_group(device, "group_norm stats", stats, &entries),
                r.stats_groups,
            ));
        }
        let finalize = k.pipelines.get(
            if self.serial_finalize {
                "group_norm_finalize_serial"
            } else {
                "group_norm_finalize"
            },
            &[],
        )?;
        let entries = [
            (0, self.finalize_uniform.as_entire_binding()),
            (1, partials),
            (2, binding_or(affine, &b.weight, &ph[0], c_bytes)),
            (3, binding_or(affine, &b.bias, &ph[1], c_bytes)),
            (4, binding(&b.mean, z.groups() * 4)),
            (5, binding(&b.rstd, z.groups() * 4)),
            (6, coef.clone()),
        ];
        out.push((
            finalize,
            bind_group(device, "group_norm_finalize", finalize, &entries),
            self.finalize_groups,
        ));
        for r in &self.ranges {
            let (at, len) = (r.range.start * group_bytes, r.range.count * group_bytes);
            let pipelines = match &k.pipelines_vec4 {
                Some(v) if vec4_bindable(&[&b.x, &b.y], at, len) => v,
                _ => &k.pipelines,
            };
            let normalize = pipelines.get(
                "batch_norm_normalize",
                &[("DROPOUT", 0), ("ALIGNED", self.aligned.into())],
            )?;
            let entries = [
                (0, r.normalize_uniform.as_entire_binding()),
                (1, binding_at(&b.x, at, len)),
                (2, binding_at(&b.y, at, len)),
                (11, ph[3].as_entire_binding()),
                (12, coef.clone()),
            ];
            out.push((
                normalize,
                bind_group(device, "group_norm normalize", normalize, &entries),
                r.normalize_groups,
            ));
        }
        Ok(out)
    }
}

/// Compiled GroupNorm backward pipelines for one device and activation storage: BatchNorm's
/// backward reduce and dx entry points and GroupNorm's finalize and parameter passes.
#[derive(Clone, Debug)]
pub struct GroupNormBackwardKernel {
    device: wgpu::Device,
    storage: Storage,
    pipelines: Pipelines,
    /// The reduce and dx passes from the vec4 variant (f32 only).
    pipelines_vec4: Option<Pipelines>,
    /// Stand-ins for γ, dγ, dβ and the generator state (BatchNorm's layouts hold it).
    placeholders: [wgpu::Buffer; 4],
}

impl Kernel for GroupNormBackwardKernel {
    fn build(device: &wgpu::Device, storage: Storage) -> Self {
        let off = |f: &[bool]| f.iter().all(|on| !on);
        let per_range = |module: &wgpu::ShaderModule, vec4: bool| {
            let mut p = Pipelines::default();
            p.add(device, module, "batch_norm_backward_reduce", &REDUCE_FLAGS, off);
            crate::kernels::cpu::add_group_norm_serial(&mut p, device, storage, vec4, false);
            p.add(device, module, "batch_norm_backward_dx", &DX_FLAGS, off);
            p.add(
                device,
                module,
                "batch_norm_backward_dx_aligned",
                &DX_ALIGNED_FLAGS,
                |f| !f[0] && !f[1],
            );
            p
        };
        let bn = shader_module(device, "batch_norm/backward.wgsl", storage, false);
        let mut pipelines = per_range(&bn, false);
        let own = shader_module(device, "group_norm/backward.wgsl", storage, false);
        for entry in BACKWARD_ENTRY_POINTS {
            pipelines.add_all(device, &own, entry, &[]);
        }
        Self {
            device: device.clone(),
            storage,
            pipelines,
            pipelines_vec4: vec4_module(device, "batch_norm/backward.wgsl", storage).map(|m| per_range(&m, true)),
            placeholders: std::array::from_fn(|_| placeholder(device, "group_norm backward placeholder")),
        }
    }
}

storage_constructors!(GroupNormBackwardKernel, "x, dy, dx");

/// The buffers of one GroupNorm backward. `x`, `dy`, `dx` are stored as the kernel's
/// [`Storage`]; everything else is f32.
#[derive(Clone, Debug)]
pub struct GroupNormBackwardBuffers<'a> {
    /// The forward's input `(N, C, *)`.
    pub x: wgpu::BufferSlice<'a>,
    /// Upstream gradient, same shape.
    pub dy: wgpu::BufferSlice<'a>,
    /// Output `dL/dx`, same shape (written, or added to with `Accumulate::dx`).
    pub dx: wgpu::BufferSlice<'a>,
    /// γ `(C)`; required with `affine`.
    pub weight: Option<wgpu::BufferSlice<'a>>,
    /// The forward's saved mean `(N, G)`.
    pub mean: wgpu::BufferSlice<'a>,
    /// The forward's saved rstd `(N, G)`.
    pub rstd: wgpu::BufferSlice<'a>,
    /// Output `dL/dγ` `(C)`; required with `affine`.
    pub dweight: Option<wgpu::BufferSlice<'a>>,
    /// Output `dL/dβ` `(C)`; required with `affine`.
    pub dbias: Option<wgpu::BufferSlice<'a>>,
}

/// One range of whole groups of a backward plan: uniforms `[write dx, add to dx]`.
#[derive(Debug)]
struct GnbRange {
    range: BindRange,
    uniforms: [wgpu::Buffer; 2],
    reduce_groups: (u32, u32),
    dx_groups: (u32, u32),
}

/// A GroupNorm backward for one shape and configuration.
#[derive(Debug)]
pub struct GroupNormBackwardPlan {
    kernel: GroupNormBackwardKernel,
    config: GroupNormConfig,
    shape: Vec<usize>,
    sizes: Sizes,
    limits: BindLimits,
    split: ReduceSplit,
    ranges: Vec<GnbRange>,
    partials: wgpu::Buffer,
    coef: wgpu::Buffer,
    /// `[write dγ/dβ, add to them]`.
    finalize_uniforms: [wgpu::Buffer; 2],
    finalize_groups: (u32, u32),
    /// One invocation per group finalizes (see [`serial_finalize`]).
    serial_finalize: bool,
    params_groups: (u32, u32),
    aligned: bool,
}

impl GroupNormBackwardKernel {
    /// A backward plan for inputs of `shape` = `(N, C, *)` with the default geometry.
    pub fn plan(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &GroupNormConfig,
    ) -> Result<GroupNormBackwardPlan> {
        self.plan_with(device, shape, config, &GroupNormPlanOptions::default())
    }

    /// A backward plan with geometry overrides.
    pub fn plan_with(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &GroupNormConfig,
        options: &GroupNormPlanOptions,
    ) -> Result<GroupNormBackwardPlan> {
        check_device(OP_BACKWARD, &self.device, device)?;
        let z = Sizes::of(&config.dims(shape)?);
        let view = BnDims {
            n: 1,
            c: z.n * z.c,
            s: z.s,
            m: z.s,
            total: z.total,
        };
        let split = ReduceSplit::resolve(options.split, OP_BACKWARD, device, &view)?;
        let run = match resolve_run(OP_BACKWARD, device, options.run)? {
            run if runs_align(z.s, run) => run,
            _ => 1,
        };
        let limits = BindLimits::of(device);
        let max = limits.max_workgroups_per_dim;
        let ranges = group_ranges(OP_BACKWARD, &z, self.storage, &limits)?;
        let chunks = z.s.div_ceil(u64::from(split.chunk()));
        let channels = z.n * z.c;
        // Per (n, c): its chunks' sums, then one slot of (Σdy·x̂, Σdy) for dγ, dβ.
        let sums_base = channels * chunks;
        let partials_bytes = (sums_base + channels) * 16;
        limits.check_size(
            OP_BACKWARD,
            "partial sums in bytes (use a larger ReduceSplit chunk)",
            partials_bytes,
        )?;
        limits.check_size(
            OP_BACKWARD,
            "per-(sample, channel) coefficients in bytes",
            channels * 16,
        )?;
        let (div_s, flags) = (FastDiv::new(z.s).words(), if config.affine { FLAG_AFFINE } else { 0 });
        let mut per_range = Vec::with_capacity(ranges.len());
        for r in &ranges {
            let chans = r.count * z.cpg;
            let uniform = |accumulate_dx: bool| {
                let params = BnBackwardParams {
                    n: 1,
                    c: chans as u32,
                    s: z.s as u32,
                    m: z.s as u32,
                    chunk_len: split.chunk(),
                    chunks: chunks as u32,
                    // Batch statistics off: the reduce centres each (n, c) on save_mean.
                    flags: if accumulate_dx { FLAG_ACCUM_DX } else { 0 },
                    total: (r.count * z.l) as u32,
                    drop_threshold: 0,
                    drop_flags: 0,
                    drop_scale: 1.0,
                    part_base: (r.start * z.cpg * chunks) as u32,
                    parts: chunks as u32,
                    m_all: z.s as u32,
                    elem_base: (r.start * z.l) as u32,
                    first: 0,
                    div_s,
                    div_c: FastDiv::new(chans).words(),
                    run,
                    chan_base: (r.start * z.cpg) as u32,
                    group_chans: z.cpg as u32,
                    _pad: 0,
                };
                uniform_buffer(device, "group_norm backward params", &params)
            };
            per_range.push(GnbRange {
                range: *r,
                uniforms: [uniform(false), uniform(true)],
                reduce_groups: reduce_groups(OP_BACKWARD, split, chans * chunks, max)?,
                dx_groups: fold_workgroups(
                    OP_BACKWARD,
                    (r.count * z.l).div_ceil(4 * WORKGROUP * u64::from(run)),
                    max,
                )?,
            });
        }
        let finalize = |accumulate: bool| {
            let params = GnParams {
                groups: z.groups() as u32,
                g: z.g as u32,
                group_chans: z.cpg as u32,
                parts: chunks as u32,
                count: z.l as u32,
                flags: flags | if accumulate { FLAG_ACCUM_PARAMS } else { 0 },
                eps: config.eps,
                n: z.n as u32,
                c: z.c as u32,
                sums_base: sums_base as u32,
                _pad: [0; 2],
            };
            uniform_buffer(device, "group_norm backward finalize params", &params)
        };
        Ok(GroupNormBackwardPlan {
            kernel: self.clone(),
            config: config.clone(),
            shape: shape.to_vec(),
            sizes: z,
            limits,
            split,
            ranges: per_range,
            partials: scratch(device, "group_norm backward partials", partials_bytes),
            coef: scratch(device, "group_norm backward coefficients", channels * 16),
            finalize_uniforms: [finalize(false), finalize(true)],
            // One invocation loops over every chunk of the group's channels, then twice over
            // the channels.
            finalize_groups: finalize_groups(
                OP_BACKWARD,
                serial_finalize(split, z.cpg * (chunks + 2)),
                z.groups(),
                max,
            )?,
            serial_finalize: serial_finalize(split, z.cpg * (chunks + 2)),
            params_groups: fold_workgroups(OP_BACKWARD, z.c.div_ceil(CHANNEL_WORKGROUP), max)?,
            aligned: runs_align(z.s, run),
        })
    }
}

impl GroupNormBackwardPlan {
    /// The input shape this plan was built for.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The configuration this plan was built for.
    pub fn config(&self) -> &GroupNormConfig {
        &self.config
    }

    /// How the activations are stored (the kernel's storage).
    pub fn storage(&self) -> Storage {
        self.kernel.storage
    }

    /// Ranges of whole groups each call dispatches.
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }

    /// How the reduce pass splits each (sample, channel).
    pub fn split(&self) -> ReduceSplit {
        self.split
    }

    /// Checks the buffers without recording anything.
    pub fn validate(&self, b: &GroupNormBackwardBuffers<'_>) -> Result<()> {
        self.args(b).map(|_| ())
    }

    fn args<'s, 'a>(&self, b: &'s GroupNormBackwardBuffers<'a>) -> Result<CallArgs<'s, 'a>> {
        let z = &self.sizes;
        let x_bytes = z.total * self.kernel.storage.element_bytes();
        let mut args = CallArgs::new(OP_BACKWARD, &self.limits);
        args.read_ranged("x", &b.x, x_bytes)?;
        args.read_ranged("dy", &b.dy, x_bytes)?;
        args.write_ranged("dx", &b.dx, x_bytes)?;
        args.read("mean", &b.mean, z.groups() * 4)?;
        args.read("rstd", &b.rstd, z.groups() * 4)?;
        if self.config.affine {
            let need =
                |what, s: &'s Option<wgpu::BufferSlice<'a>>| s.as_ref().ok_or_else(|| missing(OP_BACKWARD, what));
            args.read("weight", need("weight", &b.weight)?, z.c * 4)?;
            args.write("dweight", need("dweight", &b.dweight)?, z.c * 4)?;
            args.write("dbias", need("dbias", &b.dbias)?, z.c * 4)?;
        }
        args.check_aliasing()?;
        Ok(args)
    }

    /// Records the backward into `encoder`: writes `dx` and, with `affine`, `dγ` and `dβ`
    /// (each written or added to as `accumulate` says). Checks everything first: on error
    /// nothing is recorded.
    pub fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        b: &GroupNormBackwardBuffers<'_>,
        accumulate: Accumulate,
    ) -> Result<()> {
        check_device(OP_BACKWARD, &self.kernel.device, device)?;
        let args = self.args(b)?;
        args.record(device, encoder, "group_norm backward", || {
            self.dispatches(device, b, accumulate)
        })
    }

    fn dispatches<'p>(
        &'p self,
        device: &wgpu::Device,
        b: &GroupNormBackwardBuffers<'_>,
        accumulate: Accumulate,
    ) -> Result<Vec<Dispatch<'p>>> {
        let k = &self.kernel;
        let z = &self.sizes;
        let ph = &k.placeholders;
        let group_bytes = z.l * k.storage.element_bytes();
        let c_bytes = z.c * 4;
        let affine = self.config.affine;
        let partials = self.partials.as_entire_binding();
        let coef = self.coef.as_entire_binding();
        let mean = binding(&b.mean, z.groups() * 4);
        let rng = ph[3].as_entire_binding();
        let variant = usize::from(accumulate.dx);
        let mut out = Vec::with_capacity(2 * self.ranges.len() + 2);
        let off = [("DROPOUT", 0), ("EVAL", 0), ("PARK", 0)];
        for r in &self.ranges {
            let (at, len) = (r.range.start * group_bytes, r.range.count * group_bytes);
            let pipelines = match &k.pipelines_vec4 {
                Some(v) if z.s.is_multiple_of(4) && vec4_bindable(&[&b.x, &b.dy, &b.dx], at, len) => v,
                _ => &k.pipelines,
            };
            let entry = if self.split.serial() {
                "batch_norm_backward_reduce_serial"
            } else {
                "batch_norm_backward_reduce"
            };
            let reduce = pipelines.get(entry, &off)?;
            let entries = [
                (0, r.uniforms[variant].as_entire_binding()),
                (1, binding_at(&b.x, at, len)),
                (2, binding_at(&b.dy, at, len)),
                (3, binding_at(&b.dx, at, len)),
                (5, mean.clone()),
                (7, partials.clone()),
                (8, coef.clone()),
                (11, rng.clone()),
            ];
            out.push((
                reduce,
                bind_group(device, "group_norm backward reduce", reduce, &entries),
                r.reduce_groups,
            ));
        }
        let uniform = self.finalize_uniforms[usize::from(accumulate.params)].as_entire_binding();
        let finalize = k.pipelines.get(
            if self.serial_finalize {
                "group_norm_backward_finalize_serial"
            } else {
                "group_norm_backward_finalize"
            },
            &[],
        )?;
        let entries = [
            (0, uniform.clone()),
            (1, partials.clone()),
            (2, binding_or(affine, &b.weight, &ph[0], c_bytes)),
            (3, mean),
            (4, binding(&b.rstd, z.groups() * 4)),
            (5, coef.clone()),
        ];
        out.push((
            finalize,
            bind_group(device, "group_norm_backward_finalize", finalize, &entries),
            self.finalize_groups,
        ));
        if affine {
            let params = k.pipelines.get("group_norm_backward_params", &[])?;
            let entries = [
                (0, uniform),
                (1, partials),
                (6, binding_or(affine, &b.dweight, &ph[1], c_bytes)),
                (7, binding_or(affine, &b.dbias, &ph[2], c_bytes)),
            ];
            out.push((
                params,
                bind_group(device, "group_norm_backward_params", params, &entries),
                self.params_groups,
            ));
        }
        for r in &self.ranges {
            let (at, len) = (r.range.start * group_bytes, r.range.count * group_bytes);
            let pipelines = match &k.pipelines_vec4 {
                Some(v) if vec4_bindable(&[&b.x, &b.dy, &b.dx], at, len) => v,
                _ => &k.pipelines,
            };
            let dx = if self.aligned {
                pipelines.get(
                    "batch_norm_backward_dx_aligned",
                    &[("DROPOUT", 0), ("PARK", 0), ("ACCUMULATE", accumulate.dx.into())],
                )?
            } else {
                pipelines.get("batch_norm_backward_dx", &[("DROPOUT", 0), ("PARK", 0)])?
            };
            let entries = [
                (0, r.uniforms[variant].as_entire_binding()),
                (1, binding_at(&b.x, at, len)),
                (2, binding_at(&b.dy, at, len)),
                (3, binding_at(&b.dx, at, len)),
                (8, coef.clone()),
                (11, rng.clone()),
            ];
            out.push((
                dx,
                bind_group(device, "group_norm backward dx", dx, &entries),
                r.dx_groups,
            ));
        }
        Ok(out)
    }
}
