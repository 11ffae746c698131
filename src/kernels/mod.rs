//! The low-level layer: one kernel object per op family, built once per device, that records
//! dispatches into a caller's `CommandEncoder` on caller-supplied buffers.
//!
//! Nothing here creates a device, reads back, waits, or submits. The only allocations are made
//! once, when a *plan* is built for a shape (a small uniform buffer and scratch space); encoding
//! a plan allocates nothing but bind groups. Every argument is checked before the first command
//! is recorded, so a call that returns an error has recorded nothing.

/// The constructors and storage getter every kernel with activations shares, over its
/// [`crate::context::Kernel::build`]: `new` (f32 activations), `with_storage` (checked against
/// the device: native f16 needs `SHADER_F16`) and `storage`. `$tensors` names the activations
/// the storage applies to, for the getter's doc.
macro_rules! storage_constructors {
    ($kernel:ty, $tensors:literal) => {
        impl $kernel {
            /// Compiles the pipelines for f32 activations. A pipeline wgpu refuses goes to the
            /// device's uncaptured-error handler (wgpu's default panics);
            /// [`with_storage`](Self::with_storage) returns it as an error instead.
            pub fn new(device: &wgpu::Device) -> Self {
                <Self as crate::context::Kernel>::build(device, crate::kernels::Storage::F32)
            }

            /// Compiles the pipelines for activations stored as `storage`, inside wgpu error
            /// scopes: fails when the device cannot store them that way (see
            /// [`crate::kernels::check_storage`]) or refuses a pipeline (a limit below what a
            /// pass needs), with the error wgpu reported.
            pub fn with_storage(device: &wgpu::Device, storage: crate::kernels::Storage) -> crate::error::Result<Self> {
                crate::kernels::check_storage(device, storage)?;
                crate::context::scoped_on(device, || {
                    <Self as crate::context::Kernel>::build(device, storage)
                })
            }

            #[doc = concat!("How this kernel's activations (", $tensors, ") are stored.")]
            pub fn storage(&self) -> crate::kernels::Storage {
                self.storage
            }
        }
    };
}

pub(crate) mod args;
pub(crate) mod batch_norm;
pub(crate) mod batch_norm_backward;
pub(crate) mod copy;
pub(crate) mod cpu;
pub(crate) mod dropout;
pub(crate) mod group_norm;
pub(crate) mod layer_norm;
pub(crate) mod layer_norm_backward;
pub(crate) mod norm_configs;
pub(crate) mod rms_norm;
pub(crate) mod sgd;

pub use batch_norm::{BatchNormBuffers, BatchNormConfig, BatchNormKernel, BatchNormPlan};
pub use batch_norm_backward::{BatchNormBackwardBuffers, BatchNormBackwardKernel, BatchNormBackwardPlan};
pub use copy::{CopyGrain, CopyKernel, CopyPlan};
pub use dropout::{
    rng_state_bytes, DropoutBuffers, DropoutConfig, DropoutKernel, DropoutMode, DropoutPlan, DropoutUnit,
    RNG_STATE_BYTES,
};
pub use group_norm::{
    GroupNormBackwardBuffers, GroupNormBackwardKernel, GroupNormBackwardPlan, GroupNormBuffers, GroupNormKernel,
    GroupNormPlan, GroupNormPlanOptions,
};
pub use layer_norm::{LayerNormBuffers, LayerNormConfig, LayerNormFusion, LayerNormKernel, LayerNormPlan};
pub use layer_norm_backward::{LayerNormBackwardBuffers, LayerNormBackwardKernel, LayerNormBackwardPlan};
pub use norm_configs::{GroupNormConfig, GroupNormDims, RmsNormConfig, RMS_NORM_DEFAULT_EPS};
pub use rms_norm::{
    RmsNormBackwardBuffers, RmsNormBackwardKernel, RmsNormBackwardPlan, RmsNormBuffers, RmsNormKernel, RmsNormPlan,
    RmsNormResidualBackwardBuffers, RmsNormResidualBuffers,
};
pub use sgd::{SgdKernel, SgdPlan};

use std::num::NonZeroU64;

include!(concat!(env!("OUT_DIR"), "/shader_files.rs"));

pub use crate::shader_source::Variant;
pub use crate::storage::Storage;
pub(crate) use args::{check_device, probe_binding, CallArgs};

fn raw_source(name: &str) -> Option<&'static str> {
    SHADER_FILES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The WGSL of `file` expanded for `variant`, as the kernels compile it.
pub(crate) fn wgsl(file: &str, variant: Variant) -> String {
    let lookup = |name: &str| raw_source(name).map(str::to_string);
    let raw = raw_source(file).unwrap_or_else(|| panic!("shader {file} is not in SHADER_FILES"));
    crate::shader_source::expand_variant(raw, &lookup, variant).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Compiles `file` for activations stored as `storage` (as `vec4` arrays when `vec4`), with
/// the alternatives for the optional features `device` has (`SUBGROUP`, `SHADER_INT64`).
pub(crate) fn shader_module(device: &wgpu::Device, file: &str, storage: Storage, vec4: bool) -> wgpu::ShaderModule {
    let variant = Variant {
        storage,
        subgroups: device.features().contains(wgpu::Features::SUBGROUP),
        int64: device.features().contains(wgpu::Features::SHADER_INT64),
        vec4,
    };
    let label = format!("{file} [{}]", variant.name());
    device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(&label),
        source: wgpu::ShaderSource::Wgsl(wgsl(file, variant).into()),
    })
}

/// Checks that `device` can run kernels with activations stored as `storage`: native f16
/// needs `SHADER_F16`; f32 and packed f16 run everywhere.
pub fn check_storage(device: &wgpu::Device, storage: Storage) -> Result<()> {
    if storage == Storage::F16 && !device.features().contains(wgpu::Features::SHADER_F16) {
        return Err(Error::Unsupported {
            what: "native f16 storage (Storage::F16)".into(),
            reason: "the device was created without wgpu::Features::SHADER_F16; use Storage::F16Packed".into(),
        });
    }
    Ok(())
}

/// One WGSL module exactly as a kernel hands it to `create_shader_module`.
#[derive(Clone, Debug)]
pub struct ShaderVariant {
    /// The file in `shaders/` it comes from.
    pub file: &'static str,
    /// Its storage, optional-feature alternatives and vec4 activations. Only shaders whose
    /// includes have a subgroup alternative (BatchNorm's) have subgroup variants, only shaders
    /// that draw dropout masks have int64 ones, only files marked `// #vec4-variant` vec4 ones.
    pub variant: Variant,
    /// The WGSL source.
    pub source: String,
    /// The compute entry points the kernel builds pipelines for.
    pub entry_points: &'static [&'static str],
}

/// Every shader variant any kernel in this crate can build: each op's shader in f32, native
/// f16 and packed f16 (BatchNorm's also with subgroup operations); the copy and SGD shaders (no
/// activations) in f32. The portability test
/// translates each one to SPIR-V, MSL, HLSL and GLSL with naga.
pub fn shader_variants() -> Vec<ShaderVariant> {
    let files: [(&'static str, &'static [&'static str]); 21] = [
        ("batch_norm/forward.wgsl", batch_norm::ENTRY_POINTS),
        ("batch_norm/backward.wgsl", batch_norm_backward::ENTRY_POINTS),
        ("cpu/batch_norm/forward_channel.wgsl", cpu::BATCH_NORM_CHANNEL_FORWARD),
        ("cpu/batch_norm/backward_channel.wgsl", cpu::BATCH_NORM_CHANNEL_BACKWARD),
        ("copy/copy.wgsl", copy::ENTRY_POINTS),
        ("dropout/dropout.wgsl", dropout::ENTRY_POINTS),
        ("layer_norm/forward.wgsl", layer_norm::ENTRY_POINTS),
        ("layer_norm/backward.wgsl", layer_norm_backward::ENTRY_POINTS),
        ("cpu/batch_norm/forward_serial.wgsl", cpu::BATCH_NORM_SERIAL_FORWARD),
        ("cpu/batch_norm/backward_serial.wgsl", cpu::BATCH_NORM_SERIAL_BACKWARD),
        ("cpu/layer_norm/forward_blocks.wgsl", cpu::LAYER_NORM_BLOCKS_FORWARD),
        ("cpu/layer_norm/backward_blocks.wgsl", cpu::LAYER_NORM_BLOCKS_BACKWARD),
        ("cpu/layer_norm/forward_rows.wgsl", cpu::LAYER_NORM_ROWS_FORWARD),
        (
            "cpu/layer_norm/residual_forward_rows.wgsl",
            cpu::LAYER_NORM_ROWS_RESIDUAL_FORWARD,
        ),
        ("cpu/layer_norm/backward_rows.wgsl", cpu::LAYER_NORM_ROWS_BACKWARD),
        (
            "cpu/layer_norm/residual_backward_rows.wgsl",
            cpu::LAYER_NORM_ROWS_RESIDUAL_BACKWARD,
        ),
        ("group_norm/forward.wgsl", group_norm::FORWARD_ENTRY_POINTS),
        ("group_norm/backward.wgsl", group_norm::BACKWARD_ENTRY_POINTS),
        ("cpu/group_norm/forward_serial.wgsl", cpu::GROUP_NORM_SERIAL_FORWARD),
        ("cpu/group_norm/backward_serial.wgsl", cpu::GROUP_NORM_SERIAL_BACKWARD),
        ("sgd/sgd.wgsl", sgd::ENTRY_POINTS),
    ];
    let lookup = |name: &str| raw_source(name).map(str::to_string);
    let mut out = Vec::new();
    for (file, entry_points) in files {
        let raw = raw_source(file).expect("listed shader exists");
        for variant in crate::shader_source::variants_of(raw, &lookup) {
            out.push(ShaderVariant {
                file,
                variant,
                source: wgsl(file, variant),
                entry_points,
            });
        }
    }
    out
}

/// Names of the files that are only ever included (validated through their includers).
pub fn include_only_files() -> Vec<&'static str> {
    SHADER_FILES
        .iter()
        .filter(|(_, s)| s.starts_with("// include-only"))
        .map(|(n, _)| *n)
        .collect()
}

use crate::error::{Error, Result};

/// Largest workgroup count per dispatch dimension that every WebGPU device accepts.
pub(crate) const MAX_WORKGROUPS_PER_DIM: u32 = 65535;

/// Splits `count` workgroups over x and y so that neither exceeds `max_per_dim`. Shaders
/// recover the linear index as `wid.x + wid.y * num_workgroups.x` and skip indices past
/// `count` (at most `x − 1` padding workgroups).
pub(crate) fn fold_workgroups(op: &'static str, count: u64, max_per_dim: u32) -> Result<(u32, u32)> {
    let max = u64::from(max_per_dim.max(1));
    if count <= max {
        return Ok((count.max(1) as u32, 1));
    }
    let y = count.div_ceil(max);
    if y > max {
        return Err(Error::ExceedsLimit {
            op,
            what: "workgroups after folding into y",
            value: y,
            limit: max,
            limit_name: "max_compute_workgroups_per_dimension",
        });
    }
    Ok((max as u32, y as u32))
}

/// The device limits a plan checks caller buffers against, captured once at plan creation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BindLimits {
    pub storage_offset_alignment: u64,
    pub max_storage_binding: u64,
    pub max_workgroups_per_dim: u32,
}

impl BindLimits {
    pub fn of(device: &wgpu::Device) -> Self {
        let l = device.limits();
        Self {
            storage_offset_alignment: u64::from(l.min_storage_buffer_offset_alignment),
            max_storage_binding: l.max_storage_buffer_binding_size,
            max_workgroups_per_dim: l.max_compute_workgroups_per_dimension.min(MAX_WORKGROUPS_PER_DIM),
        }
    }

    /// Checks that `slice` can be bound as one storage buffer of `needed` bytes.
    pub fn check(
        &self,
        op: &'static str,
        what: &'static str,
        slice: &wgpu::BufferSlice<'_>,
        needed: u64,
    ) -> Result<()> {
        self.check_ranged(op, what, slice, needed)?;
        self.check_size(op, what, needed)
    }

    /// Checks that `slice` holds `needed` bytes and can be bound in the binding ranges a plan cut
    /// (see [`bind_ranges`]): usage, offset alignment and size, but not the binding limit.
    pub fn check_ranged(
        &self,
        op: &'static str,
        what: &'static str,
        slice: &wgpu::BufferSlice<'_>,
        needed: u64,
    ) -> Result<()> {
        let buffer = slice.buffer();
        if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::Buffer {
                op,
                what,
                reason: "needs STORAGE usage".into(),
            });
        }
        if !slice.offset().is_multiple_of(self.storage_offset_alignment) {
            return Err(Error::Buffer {
                op,
                what,
                reason: format!(
                    "offset {} is not a multiple of min_storage_buffer_offset_alignment = {}",
                    slice.offset(),
                    self.storage_offset_alignment
                ),
            });
        }
        // Bindings are whole 4-byte words: an odd count of halves needs its last word.
        let needed = needed.div_ceil(4) * 4;
        if slice.size() < needed {
            return Err(Error::BufferTooSmall {
                op,
                what,
                needed,
                got: slice.size(),
            });
        }
        Ok(())
    }
}

/// One binding range of a call split past `max_storage_buffer_binding_size`: items
/// `start .. start + count` (rows, samples or elements, as the plan defines them), bound at an
/// aligned offset and dispatched together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BindRange {
    pub start: u64,
    pub count: u64,
}

/// Greatest common divisor.
pub(crate) fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Cuts `items` consecutive items of `item_bytes` bytes each into as few binding ranges as
/// possible such that each range's bytes fit in one storage binding (`max_storage_buffer_binding_size`)
/// and each range starts at a byte offset that is a multiple of
/// `min_storage_buffer_offset_alignment` and at an item index that is a multiple of `multiple`.
/// A tensor that fits in one binding is one range. Fails, naming the limit, when not even one
/// aligned group of items fits.
pub(crate) fn bind_ranges(
    op: &'static str,
    what: &'static str,
    items: u64,
    item_bytes: u64,
    limits: &BindLimits,
    multiple: u64,
) -> Result<Vec<BindRange>> {
    let max = limits.max_storage_binding / 4 * 4;
    if items * item_bytes <= max {
        return Ok(vec![BindRange { start: 0, count: items }]);
    }
    let align = limits.storage_offset_alignment.max(1);
    let align_items = align / gcd(item_bytes, align);
    let step_unit = multiple.max(1) / gcd(multiple.max(1), align_items) * align_items;
    let step = max / item_bytes / step_unit * step_unit;
    if step == 0 {
        return Err(Error::ExceedsLimit {
            op,
            what,
            value: step_unit * item_bytes,
            limit: limits.max_storage_binding,
            limit_name: "max_storage_buffer_binding_size",
        });
    }
    Ok((0..items)
        .step_by(step as usize)
        .map(|start| BindRange {
            start,
            count: step.min(items - start),
        })
        .collect())
}

/// A storage binding of `bytes` bytes (rounded up to 4) starting `offset` bytes into `slice`.
pub(crate) fn binding_at<'a>(slice: &wgpu::BufferSlice<'a>, offset: u64, bytes: u64) -> wgpu::BindingResource<'a> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer: slice.buffer(),
        offset: slice.offset() + offset,
        size: NonZeroU64::new(bytes.div_ceil(4).max(1) * 4),
    })
}

impl BindLimits {
    /// Checks that a whole tensor of `bytes` fits in one storage binding.
    pub fn check_size(&self, op: &'static str, what: &'static str, bytes: u64) -> Result<()> {
        if bytes > self.max_storage_binding {
            return Err(Error::ExceedsLimit {
                op,
                what,
                value: bytes,
                limit: self.max_storage_binding,
                limit_name: "max_storage_buffer_binding_size",
            });
        }
        Ok(())
    }
}

/// Checks a buffer a plan copies `bytes` to or from: large enough from its offset, the offset
/// a multiple of 4 (`COPY_BUFFER_ALIGNMENT`), and with `usage` (`COPY_SRC` or `COPY_DST`).
pub(crate) fn check_copy(
    op: &'static str,
    what: &'static str,
    slice: &wgpu::BufferSlice<'_>,
    bytes: u64,
    usage: wgpu::BufferUsages,
) -> Result<()> {
    let buffer = slice.buffer();
    if !buffer.usage().contains(usage) {
        return Err(Error::Buffer {
            op,
            what,
            reason: format!("needs usage {usage:?}, has {:?}", buffer.usage()),
        });
    }
    if !slice.offset().is_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT) {
        return Err(Error::Buffer {
            op,
            what,
            reason: format!("offset {} is not a multiple of 4", slice.offset()),
        });
    }
    let have = slice.size();
    if have < bytes {
        return Err(Error::BufferTooSmall {
            op,
            what,
            got: have,
            needed: bytes,
        });
    }
    Ok(())
}

/// Checks that `eps` of `op` is finite and > 0 ([`Error::InvalidArgument`] otherwise).
pub(crate) fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if eps.is_finite() && eps > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("eps must be finite and > 0, got {eps}")))
    }
}

/// The kernels index with u32 and keep counts at most 2^31: [`Error::ExceedsLimit`] naming
/// `what` of `op` and the rule (`limit_name`) above that.
pub(crate) fn check_index_limit(
    op: &'static str,
    what: &'static str,
    value: u64,
    limit_name: &'static str,
) -> Result<()> {
    if value <= 1 << 31 {
        Ok(())
    } else {
        Err(Error::ExceedsLimit {
            op,
            what,
            value,
            limit: 1 << 31,
            limit_name,
        })
    }
}

/// A uniform buffer holding `value` (a `#[repr(C)]` mirror of a WGSL struct).
pub(crate) fn uniform_buffer<T: bytemuck::Pod>(device: &wgpu::Device, label: &str, value: &T) -> wgpu::Buffer {
    use wgpu::util::DeviceExt;
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::bytes_of(value),
        usage: wgpu::BufferUsages::UNIFORM,
    })
}

/// One dispatch: pipeline, its group-0 bind group, and workgroups in x and y.
pub(crate) type Dispatch<'a> = (&'a wgpu::ComputePipeline, wgpu::BindGroup, (u32, u32));

/// Records `dispatches` in order into one compute pass named `label`.
pub(crate) fn record(encoder: &mut wgpu::CommandEncoder, label: &str, dispatches: &[Dispatch<'_>]) {
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: None,
    });
    for (pipeline, group, (x, y)) in dispatches {
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, group, &[]);
        pass.dispatch_workgroups(*x, *y, 1);
    }
}

/// A storage binding of exactly `bytes` bytes at the slice's offset (rounded up to 4 bytes,
/// which the checks guarantee fits in the slice for the 4-byte element types used here).
pub(crate) fn binding<'a>(slice: &wgpu::BufferSlice<'a>, bytes: u64) -> wgpu::BindingResource<'a> {
    binding_at(slice, 0, bytes)
}

/// Division of indices below 2^31 by a divisor fixed per dispatch, as a multiply and a shift
/// (`fast_div` in `shaders/lib/nchw.wgsl`): `n / d = mulhi(n, m) >> s`, or `n` when `m = 0`
/// (`d = 1`). With `l = ⌈log2 d⌉ ≥ 1`, `m = ⌈2^(31+l) / d⌉` and `s = l − 1`: for `n < 2^31` the
/// rounding of `m` adds less than `n / 2^(31+l) < 1/d` to `n / d`, which never reaches the next
/// integer; and `m < 2^32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FastDiv {
    m: u32,
    s: u32,
}

impl FastDiv {
    /// The pair for divisor `d` (1 ..= 2^31).
    pub(crate) fn new(d: u64) -> Self {
        assert!((1..=1 << 31).contains(&d), "FastDiv divisor {d} out of range");
        if d == 1 {
            return Self { m: 0, s: 0 };
        }
        let l = 64 - (d - 1).leading_zeros();
        let m = (1u64 << (31 + l)).div_ceil(d);
        Self {
            m: u32::try_from(m).expect("m < 2^32 for d > 1"),
            s: l - 1,
        }
    }

    /// `[m, s]`, as the shaders' `vec2<u32>` takes it.
    pub(crate) fn words(self) -> [u32; 2] {
        [self.m, self.s]
    }

    /// `n / d` computed the shaders' way (for tests).
    #[cfg(test)]
    fn apply(self, n: u32) -> u32 {
        if self.m == 0 {
            return n;
        }
        ((u64::from(n) * u64::from(self.m)) >> 32) as u32 >> self.s
    }
}

/// Host threads the geometry policies for CPU adapters size their work for (a CPU driver runs
/// about one worker per core): the available parallelism, at least 1.
pub fn host_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Whether a plan takes an optional faster pass: never with `wanted == Some(false)`; where it is
/// `possible` with `Some(true)`, and an error made by `refused` where it is not; by default
/// where it is possible and the plan's policy (`by_default`) agrees.
pub(crate) fn optional_pass(
    wanted: Option<bool>,
    possible: bool,
    by_default: bool,
    refused: impl FnOnce() -> Error,
) -> Result<bool> {
    match wanted {
        Some(false) => Ok(false),
        Some(true) if possible => Ok(true),
        Some(true) => Err(refused()),
        None => Ok(possible && by_default),
    }
}

/// Whether `bytes` from byte `at` of every slice can be bound as `array<vec4<f32>>` (the vec4
/// shader variants): a whole number of 16-byte vectors at 16-byte-aligned offsets.
pub(crate) fn vec4_bindable(slices: &[&wgpu::BufferSlice<'_>], at: u64, bytes: u64) -> bool {
    bytes.is_multiple_of(16) && slices.iter().all(|s| (s.offset() + at).is_multiple_of(16))
}

/// The vec4 variant of `file` (activations as `array<vec4<f32>>`) when `storage` is f32.
pub(crate) fn vec4_module(device: &wgpu::Device, file: &str, storage: Storage) -> Option<wgpu::ShaderModule> {
    (storage == Storage::F32).then(|| shader_module(device, file, storage, true))
}

/// `slice` bound as `bytes` when the configuration uses it (`used`) and it is given, otherwise
/// the placeholder that stands in for an unused binding.
pub(crate) fn binding_or<'a>(
    used: bool,
    slice: &Option<wgpu::BufferSlice<'a>>,
    placeholder: &'a wgpu::Buffer,
    bytes: u64,
) -> wgpu::BindingResource<'a> {
    match slice {
        Some(s) if used => binding(s, bytes),
        _ => placeholder.as_entire_binding(),
    }
}

/// Builds a bind group for group 0 of `pipeline` from `(binding, resource)` pairs.
pub(crate) fn bind_group(
    device: &wgpu::Device,
    label: &str,
    pipeline: &wgpu::ComputePipeline,
    entries: &[(u32, wgpu::BindingResource<'_>)],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = entries
        .iter()
        .map(|(binding, resource)| wgpu::BindGroupEntry {
            binding: *binding,
            resource: resource.clone(),
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

/// A WGSL `override` constant of a shader and its value for one pipeline: a flag
/// (`override DROPOUT: bool = false;`, 0 or 1) or a count (`override TRIPLES: u32`). Variants of
/// one algorithm (with or without a fused dropout, writing or adding) are one entry point
/// specialised by such constants: the driver compiles each pipeline with them as constants and
/// drops the untaken side, as it would for a literal.
pub(crate) type Flag = (&'static str, u32);

/// The pipelines of one kernel, keyed by (entry point, override constants). A kernel builds
/// every combination its plans can take when it is built; `encode` looks one up.
#[derive(Clone, Debug, Default)]
pub(crate) struct Pipelines {
    map: std::collections::HashMap<(&'static str, Vec<Flag>), wgpu::ComputePipeline>,
    /// Constants set on every pipeline built here and left out of the keys: what makes one
    /// kernel family out of another's shaders (RMSNorm's `RMS` on LayerNorm's passes).
    fixed: Vec<Flag>,
}

impl Pipelines {
    /// No pipelines yet; every pipeline built will also have the constants `fixed`.
    pub(crate) fn with_fixed(fixed: &[Flag]) -> Self {
        Self {
            map: Default::default(),
            fixed: fixed.to_vec(),
        }
    }

    /// Builds `entry` of `module` once for every combination of the values in `choices`
    /// (`(constant, values)`) that `wanted` accepts (it sees one value per constant, in order).
    pub(crate) fn add_choices(
        &mut self,
        device: &wgpu::Device,
        module: &wgpu::ShaderModule,
        entry: &'static str,
        choices: &[(&'static str, &[u32])],
        wanted: impl Fn(&[u32]) -> bool,
    ) {
        let mut combos: Vec<Vec<Flag>> = vec![Vec::new()];
        for &(name, values) in choices {
            combos = combos
                .into_iter()
                .flat_map(|combo| {
                    values.iter().map(move |&v| {
                        let mut next = combo.clone();
                        next.push((name, v));
                        next
                    })
                })
                .collect();
        }
        for key in combos {
            let values: Vec<u32> = key.iter().map(|&(_, v)| v).collect();
            if wanted(&values) {
                let all: Vec<Flag> = key.iter().chain(&self.fixed).copied().collect();
                let pipeline = compute_pipeline_with(device, module, entry, &all);
                self.map.insert((entry, Self::canonical(&key)), pipeline);
            }
        }
    }

    /// [`add_choices`](Self::add_choices) for boolean `flags`: every combination of on and off
    /// that `wanted` accepts (it sees one value per flag, in order).
    pub(crate) fn add(
        &mut self,
        device: &wgpu::Device,
        module: &wgpu::ShaderModule,
        entry: &'static str,
        flags: &[&'static str],
        wanted: impl Fn(&[bool]) -> bool,
    ) {
        let choices: Vec<(&'static str, &[u32])> = flags.iter().map(|&f| (f, &[0, 1][..])).collect();
        self.add_choices(device, module, entry, &choices, |v| {
            wanted(&v.iter().map(|&x| x != 0).collect::<Vec<_>>())
        });
    }

    /// [`add`](Self::add) for every combination of `flags`.
    pub(crate) fn add_all(
        &mut self,
        device: &wgpu::Device,
        module: &wgpu::ShaderModule,
        entry: &'static str,
        flags: &[&'static str],
    ) {
        self.add(device, module, entry, flags, |_| true);
    }

    /// The pipeline of `entry` with `flags` (every constant it was built with, in any order),
    /// if the kernel built it.
    pub(crate) fn find(&self, entry: &'static str, flags: &[Flag]) -> Option<&wgpu::ComputePipeline> {
        self.map.get(&(entry, Self::canonical(flags)))
    }

    /// [`find`](Self::find) for a combination the kernel always builds: a missing one is an
    /// internal error, never a panic.
    pub(crate) fn get(&self, entry: &'static str, flags: &[Flag]) -> Result<&wgpu::ComputePipeline> {
        self.find(entry, flags)
            .ok_or_else(|| Error::Internal(format!("no pipeline was built for {entry} with {flags:?}")))
    }

    fn canonical(flags: &[Flag]) -> Vec<Flag> {
        let mut key = flags.to_vec();
        key.sort_unstable();
        key
    }
}

/// A compute pipeline for `entry` of `module` with its override `flags` set.
pub(crate) fn compute_pipeline_with(
    device: &wgpu::Device,
    module: &wgpu::ShaderModule,
    entry: &str,
    flags: &[Flag],
) -> wgpu::ComputePipeline {
    let constants: Vec<(&str, f64)> = flags.iter().map(|&(name, v)| (name, f64::from(v))).collect();
    let label: String = std::iter::once(entry.to_string())
        .chain(
            flags
                .iter()
                .filter(|(_, v)| *v != 0)
                .map(|(name, v)| format!("{name}={v}")),
        )
        .collect::<Vec<_>>()
        .join(" ");
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(&label),
        layout: None,
        module,
        entry_point: Some(entry),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &constants,
            ..Default::default()
        },
        cache: None,
    })
}

/// Compiles one entry point of a WGSL module with a layout derived from the shader.
pub(crate) fn compute_pipeline(
    device: &wgpu::Device,
    module: &wgpu::ShaderModule,
    entry: &str,
) -> wgpu::ComputePipeline {
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(entry),
        layout: None,
        module,
        entry_point: Some(entry),
        compilation_options: Default::default(),
        cache: None,
    })
}

/// A tiny storage buffer bound where a shader declares a binding that this call does not use
/// (e.g. γ/β when `affine = false`). WebGPU requires every declared binding to be bound.
pub(crate) fn placeholder(device: &wgpu::Device, label: &str) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: 16,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_div_is_exact_below_2_pow_31() {
        let mut divisors: Vec<u64> = (1..=2000).collect();
        for k in 1..=31u32 {
            let p = 1u64 << k;
            divisors.extend([p - 1, p, p + 1]);
        }
        divisors.extend([3 * 7 * 49, 784, 3136, 12544, 65535, 65537, 1_000_003, (1 << 31) - 1]);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for &d in divisors.iter().filter(|&&d| (1..=1 << 31).contains(&d)) {
            let f = FastDiv::new(d);
            let mut ns: Vec<u64> = vec![0, 1, d - 1, d, d + 1, (1 << 31) - 1, (1 << 31) - 2];
            // Around multiples of d near the top of the range, and random values.
            let top = ((1u64 << 31) - 1) / d * d;
            ns.extend([
                top,
                top.saturating_sub(1),
                top.saturating_sub(d),
                top.saturating_sub(d + 1),
            ]);
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ns.push(x % (1 << 31));
            }
            for n in ns.into_iter().filter(|&n| n < 1 << 31) {
                assert_eq!(u64::from(f.apply(n as u32)), n / d, "{n} / {d} with {f:?}");
            }
        }
    }

    use super::*;

    fn limits(max: u64, align: u64) -> BindLimits {
        BindLimits {
            storage_offset_alignment: align,
            max_storage_binding: max,
            max_workgroups_per_dim: 65535,
        }
    }

    #[test]
    fn chunks_cover_every_item_once_at_aligned_offsets_within_the_limit() {
        for (items, item_bytes, max, align, multiple) in [
            (1000u64, 4u64, 1024u64, 256u64, 4u64),
            (50_003, 4, 65536, 32, 4),
            (100_001, 2, 65536, 256, 4),
            (80, 2100, 65536, 32, 4),
            (400, 202, 65536, 16, 64),
            (7, 12, 1 << 20, 256, 1),
        ] {
            let ranges = bind_ranges("t", "w", items, item_bytes, &limits(max, align), multiple).unwrap();
            let mut next = 0;
            for c in &ranges {
                assert_eq!(c.start, next, "{items} x {item_bytes}: contiguous");
                assert!(c.count > 0 && c.count * item_bytes <= max, "{c:?} over the limit");
                if ranges.len() > 1 {
                    assert_eq!(c.start * item_bytes % align, 0, "{c:?} offset not aligned");
                    assert_eq!(c.start % multiple, 0, "{c:?} not a multiple of {multiple}");
                }
                next = c.start + c.count;
            }
            assert_eq!(next, items);
        }
        // Fits: one chunk, whatever the alignment.
        assert_eq!(bind_ranges("t", "w", 3, 5, &limits(16, 256), 4).unwrap().len(), 1);
        // Not even one aligned group fits.
        let e = bind_ranges("t", "one row", 10, 1000, &limits(1024, 256), 4).unwrap_err();
        assert!(e.to_string().contains("max_storage_buffer_binding_size"), "{e}");
    }

    #[test]
    fn fold_keeps_small_counts_in_x() {
        assert_eq!(fold_workgroups("t", 1, 65535).unwrap(), (1, 1));
        assert_eq!(fold_workgroups("t", 65535, 65535).unwrap(), (65535, 1));
    }

    #[test]
    fn fold_covers_large_counts_with_little_padding() {
        for count in [65536u64, 100_000, 65535 * 7 + 3, 4_000_000] {
            let (x, y) = fold_workgroups("t", count, 65535).unwrap();
            let covered = u64::from(x) * u64::from(y);
            assert!(covered >= count, "{count}: {x}x{y}");
            assert!(covered - count < u64::from(x), "{count}: {x}x{y} pads a whole row");
        }
        assert!(fold_workgroups("t", 65535u64 * 65535 + 1, 65535).is_err());
    }
}
