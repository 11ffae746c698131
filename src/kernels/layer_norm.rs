//! LayerNorm forward, low level, optionally fused with dropout: [`LayerNormKernel`] (one per
//! device) and [`LayerNormPlan`] (one per shape, configuration and fusion). See
//! `shaders/layer_norm/forward.wgsl` for the math and geometry.

use crate::context::Kernel;
use crate::error::{Error, Result};
use crate::kernels::cpu::{SG_LANES, SG_TRIPLES};
use crate::kernels::dropout::{DropoutConfig, RNG_STATE_BYTES};
use crate::kernels::{
    bind_group, bind_ranges, binding, binding_at, binding_or, check_device, check_eps, check_index_limit,
    fold_workgroups, optional_pass, placeholder, uniform_buffer, vec4_bindable, vec4_module, BindLimits, BindRange,
    CallArgs, Dispatch, Flag, Pipelines, Storage,
};

const OP: &str = "layer_norm";

/// Entry points in `shaders/layer_norm/forward.wgsl` that get a pipeline.
/// `layer_norm_forward` and `layer_norm_block_forward` take the fused dropout as the `DROPOUT` override.
pub(crate) const ENTRY_POINTS: &[&str] = &["layer_norm_forward", "layer_norm_residual_dropout_forward"];

/// Rows per workgroup of the row-block path (one lane per row): `BLOCK` in the shaders.
pub(crate) const BLOCK_ROWS: u64 = 64;

/// Widest row kept in registers (one read of the input) at the largest `lanes` (256, 16 values
/// each); wider rows always take a second read. With fewer lanes, a row stays in registers when
/// it touches at most `4·lanes` mask quads (`16·lanes` elements for widths that are multiples
/// of 4).
pub const ONCHIP_MAX_WIDTH: usize = 4096;

/// Storage buffers the residual variant binds in one dispatch (forward and backward).
const RESIDUAL_STORAGE_BINDINGS: u32 = 9;
const RESIDUAL_PASS: &str = "storage buffers of the fused residual+dropout+LayerNorm pass";

const FLAG_WEIGHT: u32 = 1;
const FLAG_BIAS: u32 = 2;

/// LayerNorm hyper-parameters, with PyTorch's meanings and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormConfig {
    /// The trailing dims normalized over; their product is the row width W.
    pub normalized_shape: Vec<usize>,
    /// Added to the variance. Default `1e-5`; must be finite and > 0.
    pub eps: f32,
    /// Learnable γ (and β unless `bias = false`) of shape `normalized_shape`. Default `true`.
    pub elementwise_affine: bool,
    /// Learnable β when `elementwise_affine`. Default `true`.
    pub bias: bool,
}

impl LayerNormConfig {
    /// PyTorch's defaults for `normalized_shape`.
    pub fn new(normalized_shape: &[usize]) -> Self {
        Self {
            normalized_shape: normalized_shape.to_vec(),
            eps: 1e-5,
            elementwise_affine: true,
            bias: true,
        }
    }

    /// W = ∏ normalized_shape (`usize::MAX` if the product overflows, which
    /// [`validate`](Self::validate) refuses).
    pub fn width(&self) -> usize {
        crate::tensor::numel(&self.normalized_shape).unwrap_or(usize::MAX)
    }

    /// Whether γ is used.
    pub fn has_weight(&self) -> bool {
        self.elementwise_affine
    }

    /// Whether β is used.
    pub fn has_bias(&self) -> bool {
        self.elementwise_affine && self.bias
    }

    /// Checks every field's domain.
    pub fn validate(&self) -> Result<()> {
        if self.normalized_shape.is_empty() || self.normalized_shape.contains(&0) {
            return Err(Error::invalid(
                OP,
                format!(
                    "normalized_shape must be non-empty with no zero dim, got {:?}",
                    self.normalized_shape
                ),
            ));
        }
        check_eps(OP, self.eps)?;
        check_index_limit(
            OP,
            "normalized_shape elements",
            self.width() as u64,
            "2^31 elements per row (u32 indexing)",
        )
    }

    /// `(rows, width)` of an input `shape`, whose trailing dims must equal `normalized_shape`.
    pub fn rows_and_width(&self, shape: &[usize]) -> Result<(u64, u64)> {
        let k = self.normalized_shape.len();
        if shape.len() < k || shape[shape.len() - k..] != self.normalized_shape[..] {
            return Err(Error::shape(
                OP,
                "input",
                shape,
                format!("trailing dims equal to normalized_shape {:?}", self.normalized_shape),
            ));
        }
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .unwrap_or(u64::MAX);
        if numel == 0 {
            return Err(Error::shape(
                OP,
                "input",
                shape,
                "no zero-sized dimension (empty tensors are not supported)",
            ));
        }
        check_index_limit(OP, "input elements", numel, "2^31 elements per call (u32 indexing)")?;
        let width = self.width() as u64;
        Ok((numel / width, width))
    }
}

/// What a LayerNorm plan fuses with dropout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LayerNormFusion {
    /// Plain LayerNorm.
    None,
    /// `y = dropout(LayerNorm(x))`.
    Dropout(DropoutConfig),
    /// The pre-norm residual block: `h = residual + dropout(x)`, `y = LayerNorm(h)`; writes both.
    ResidualDropout(DropoutConfig),
}

/// Mirrors `struct Params` in `shaders/layer_norm/forward.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct LnParams {
    rows: u32,
    width: u32,
    flags: u32,
    eps: f32,
    drop_threshold: u32,
    drop_flags: u32,
    drop_scale: f32,
    lanes: u32,
    row_base: u32,
    _pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<LnParams>() == 48);

/// Most 4-element mask quads a row of `width` touches (`max_quads` in the shaders): W/4 when
/// every row starts on a quad, else up to two partial quads more.
fn max_quads(width: u64) -> u64 {
    if width.is_multiple_of(4) {
        width / 4
    } else {
        (width + 2) / 4 + 1
    }
}

/// Invocations per row on a GPU: the smallest power of two in 8..=256 whose registers (4 quads
/// each) hold the row (256 for rows too wide for registers). A workgroup of 256 runs
/// `256 / lanes` rows.
pub(crate) fn gpu_lanes(width: u64) -> u32 {
    (max_quads(width).div_ceil(4).next_power_of_two().clamp(8, 256)) as u32
}

/// Invocations per row (a power of two in 1..=256) that the LayerNorm passes (forward, and the
/// backward's dx pass) give a `rows × width` input on an adapter of `device_type` whose host
/// runs `threads` threads (used for CPU adapters only).
///
/// - GPUs: the smallest power of two in 8..=256 whose lanes hold the row in registers, 16 values
///   (4 mask quads) each (256 past that), so a row up to 4096 wide is read once and wide rows
///   spread over a workgroup.
/// - CPU adapters (lavapipe, llvmpipe, WARP): as few as still give every thread two
///   workgroups, down to one invocation per row. A CPU driver runs a SIMD group of 8
///   invocations as one, so a lane's fixed cost (its share of the row merge, the barriers, the
///   per-lane address arithmetic) is paid per invocation, not per element; a row per
///   invocation pays it once. `layer_norm_forward` 1024x768 on lavapipe: 2.0x less time with 1 lane per row
///   than with the GPU's 64.
///
/// One lane per row is the row-block path: a workgroup of 64 invocations takes 64 rows, reduces
/// them one row per invocation, then finishes them one column quad per invocation from the
/// core's cache (γ and β read once per column; the backward's dγ/dβ partials summed in the same
/// pass instead of a second read of x and dy). It is chosen when the input has two 64-row
/// blocks per host thread. On adapters with 8-lane
/// subgroups, plans with one lane per row take the row-per-subgroup passes instead where the
/// row fits (the same 64-row grid; see [`LayerNormPlanOptions::subgroup_rows`]).
pub fn default_lanes(device_type: wgpu::DeviceType, rows: u64, width: u64, threads: usize) -> u32 {
    let gpu = gpu_lanes(width);
    if device_type != wgpu::DeviceType::Cpu {
        return gpu;
    }
    let wanted = 2 * threads.max(1) as u64;
    if rows.div_ceil(BLOCK_ROWS) >= wanted {
        return 1;
    }
    // Fewer rows: the narrowest lane segments that still give every thread two workgroups
    // (256/lanes rows each; 2 and 4 lanes give no more workgroups than the block path).
    let mut lanes = 8;
    while lanes < gpu && rows.div_ceil(u64::from(256 / lanes)) < wanted {
        lanes *= 2;
    }
    lanes
}

/// Geometry overrides for a LayerNorm plan, forward ([`LayerNormKernel::plan_with`]) or
/// backward ([`crate::LayerNormBackwardKernel::plan_with`]). `Default` leaves every choice to
/// the device's policy; results agree within rounding whatever is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerNormPlanOptions {
    /// Invocations per row: a power of two in 1..=256. `None`: [`default_lanes`] for the
    /// device's adapter type and the host's available parallelism. 1 selects the row-block
    /// path (workgroups of 64 rows; see [`default_lanes`]).
    pub lanes: Option<u32>,
    /// Where the row-block path runs on a CPU adapter with `SUBGROUP` of at least 8 lanes, f32
    /// activations and a width that is a multiple of 4 and at most 768 (96 per lane), a
    /// workgroup of one 8-lane subgroup walks each 64-row block holding one row at a time in
    /// registers instead: x (and dy) read once, no workgroup memory, no barrier (forward:
    /// `shaders/cpu/layer_norm/forward_rows.wgsl`, `cpu/layer_norm/residual_forward_rows.wgsl`; the backward's
    /// dx pass: `cpu/layer_norm/backward_rows.wgsl`, `cpu/layer_norm/residual_backward_rows.wgsl`).
    /// `None`: wherever it can; `Some(false)`: never; `Some(true)`: the plan fails with
    /// [`Error::Unsupported`] where it cannot. Calls whose buffers cannot bind as 16-byte
    /// vectors take the row-block path either way.
    pub subgroup_rows: Option<bool>,
}

impl LayerNormPlanOptions {
    /// The lanes a plan for `rows × width` on `device` uses, after checking an override.
    pub(crate) fn lanes(&self, op: &'static str, device: &wgpu::Device, rows: u64, width: u64) -> Result<u32> {
        match self.lanes {
            Some(lanes) if lanes.is_power_of_two() && lanes <= 256 => Ok(lanes),
            Some(lanes) => Err(Error::invalid(
                op,
                format!("lanes must be a power of two in 1..=256, got {lanes}"),
            )),
            None => {
                let threads = crate::kernels::host_threads();
                Ok(default_lanes(device.adapter_info().device_type, rows, width, threads))
            }
        }
    }
}

/// Compiled LayerNorm pipelines for one device and activation storage.
#[derive(Clone, Debug)]
pub struct LayerNormKernel {
    device: wgpu::Device,
    storage: Storage,
    /// Every entry point of `layer_norm/forward.wgsl` (see [`forward_entry`]). The residual
    /// ones bind 9 storage buffers and exist only on devices whose
    /// `max_storage_buffers_per_shader_stage` allows that (WebGPU's default is 8): elsewhere
    /// the kernel still serves the plain and dropout passes, and a residual plan is refused.
    passes: Pipelines,
    /// The same from the vec4 variant (f32 only): rows of whole quads (W % 4 == 0) whose
    /// activations bind as whole 16-byte vectors.
    vec4: Option<Pipelines>,
    /// Stand-ins for γ and β when the configuration has none, and for the generator state
    /// without dropout.
    placeholders: [wgpu::Buffer; 3],
    /// The row-per-subgroup forward (vec4 variant) for every [`SG_TRIPLES`]: built where
    /// `cpu_subgroup_passes`; the residual block's only where its 9 storage buffers fit.
    subgroup: Option<Pipelines>,
}

/// The entry point and override flags of the forward pass for `fusion`, on the row-block path
/// (`blocks`) or the lane path.
fn forward_entry(fusion: LayerNormFusion, blocks: bool) -> (&'static str, Vec<Flag>) {
    let residual = matches!(fusion, LayerNormFusion::ResidualDropout(_));
    let dropout = matches!(fusion, LayerNormFusion::Dropout(_));
    match (blocks, residual) {
        (false, false) => ("layer_norm_forward", vec![("DROPOUT", dropout.into())]),
        (true, false) => ("layer_norm_block_forward", vec![("DROPOUT", dropout.into())]),
        (false, true) => ("layer_norm_residual_dropout_forward", vec![]),
        (true, true) => ("layer_norm_block_residual_dropout_forward", vec![]),
    }
}

impl Kernel for LayerNormKernel {
    fn build(device: &wgpu::Device, storage: Storage) -> Self {
        Self::build_with(device, storage, false)
    }
}

/// The override constants every pipeline of a LayerNorm kernel carries: `RMS` for RMSNorm's.
pub(crate) fn norm_constants(rms: bool) -> &'static [Flag] {
    if rms {
        &[("RMS", 1)]
    } else {
        &[]
    }
}

impl LayerNormKernel {
    /// LayerNorm's pipelines, or with `rms` the same passes as RMSNorm's (`RMS` set on every
    /// pipeline).
    pub(crate) fn build_with(device: &wgpu::Device, storage: Storage, rms: bool) -> Self {
        // The lane path's pipelines and, beside them, the row-block path's (CPU adapters' default,
        // but built everywhere: a plan may ask for one lane per row on any device).
        let passes = |module: &wgpu::ShaderModule, vec4: bool| {
            let mut p = Pipelines::with_fixed(norm_constants(rms));
            p.add_all(device, module, "layer_norm_forward", &["DROPOUT"]);
            if residual_fits(device) {
                p.add_all(device, module, "layer_norm_residual_dropout_forward", &[]);
            }
            crate::kernels::cpu::add_layer_norm_blocks_forward(&mut p, device, storage, vec4);
            p
        };
        let module = crate::kernels::shader_module(device, "layer_norm/forward.wgsl", storage, false);
        Self {
            device: device.clone(),
            storage,
            passes: passes(&module, false),
            vec4: vec4_module(device, "layer_norm/forward.wgsl", storage).map(|m| passes(&m, true)),
            placeholders: std::array::from_fn(|_| placeholder(device, "layer_norm placeholder")),
            subgroup: crate::kernels::cpu::layer_norm_rows_forward(device, storage, norm_constants(rms)),
        }
    }
}

/// Index into [`SG_TRIPLES`] of the entry points that hold a row of `width` (a multiple of 4)
/// with `lanes` invocations per row, if any does.
fn subgroup_triples(width: u64, lanes: u32) -> Option<usize> {
    if !width.is_multiple_of(4) || lanes == 0 {
        return None;
    }
    let per_lane = (width / 4).div_ceil(u64::from(lanes)).div_ceil(3);
    SG_TRIPLES.iter().position(|&t| u64::from(t) >= per_lane)
}

/// The [`SG_TRIPLES`] index a plan (forward or backward) takes the row-per-subgroup pass with,
/// if it does: where the kernel has the pipelines and the plan's geometry and fusion allow
/// (`possible`), and a row of `width` fits [`SG_LANES`] lanes, unless the caller said no
/// (`wanted`, [`LayerNormPlanOptions::subgroup_rows`]; `Some(true)` where it cannot is an error).
pub(crate) fn subgroup_choice(possible: bool, width: u64, wanted: Option<bool>) -> Result<Option<usize>> {
    let triples = subgroup_triples(width, SG_LANES);
    let taken = optional_pass(wanted, possible && triples.is_some(), true, || Error::Unsupported {
        what: "the row-per-subgroup LayerNorm pass".into(),
        reason: format!(
            "it needs a CPU adapter with SUBGROUP of at least {SG_LANES} lanes, f32 activations, \
             the row-block path (lanes 1), the device's binding limit for the residual block, \
             and a width that is a multiple of 4 and at most 96 per subgroup lane (width {width})"
        ),
    })?;
    Ok(triples.filter(|_| taken))
}

/// How a LayerNorm plan (forward or backward) walks its rows. Chosen once, at plan creation, by
/// [`row_path`]; `encode` records the chosen path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowPath {
    /// `lanes` invocations per row, 256/lanes rows side by side in a workgroup of 256: the GPU
    /// path (the row in registers up to 16 values per lane).
    Lanes(u32),
    /// The row-block path (CPU adapters, one lane per row): a workgroup per block of 64 rows,
    /// one invocation per row, then columns from the core's cache.
    Blocks,
    /// A row per subgroup, held in registers (`triples` triples of quads per lane), walking the
    /// same 64-row blocks (CPU adapters with `SUBGROUP`): `shaders/cpu/layer_norm/`.
    SubgroupRows {
        /// The `TRIPLES` constant of the pipelines: one of [`SG_TRIPLES`].
        triples: u32,
    },
}

impl RowPath {
    /// Whether rows are walked in 64-row blocks (the row-block and row-per-subgroup paths).
    pub(crate) fn blocks(self) -> bool {
        !matches!(self, RowPath::Lanes(_))
    }

    /// The path one range takes: the row-per-subgroup passes read only the vec4 variant, so a
    /// range whose buffers do not bind as 16-byte vectors takes the row-block path.
    pub(crate) fn for_range(self, vec4: bool) -> RowPath {
        match self {
            RowPath::SubgroupRows { .. } if !vec4 => RowPath::Blocks,
            path => path,
        }
    }
}

/// The one choice of a LayerNorm plan's path, from `lanes` (the options' or `default_lanes`),
/// whether the kernel has the row-per-subgroup pass for this fusion (`subgroup_possible`), the
/// row width and the options' `subgroup_rows`.
pub(crate) fn row_path(lanes: u32, subgroup_possible: bool, width: u64, wanted: Option<bool>) -> Result<RowPath> {
    let blocks = lanes == 1;
    Ok(match subgroup_choice(blocks && subgroup_possible, width, wanted)? {
        Some(t) => RowPath::SubgroupRows { triples: SG_TRIPLES[t] },
        None if blocks => RowPath::Blocks,
        None => RowPath::Lanes(lanes),
    })
}

storage_constructors!(LayerNormKernel, "x, y, residual, h");

impl LayerNormKernel {
    /// A plan for inputs of `shape` (trailing dims = `config.normalized_shape`), with the
    /// device's default geometry.
    pub fn plan(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &LayerNormConfig,
        fusion: LayerNormFusion,
    ) -> Result<LayerNormPlan> {
        self.plan_with(device, shape, config, fusion, &LayerNormPlanOptions::default())
    }

    /// [`Self::plan`] with geometry overrides (see [`LayerNormPlanOptions`]).
    pub fn plan_with(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &LayerNormConfig,
        fusion: LayerNormFusion,
        options: &LayerNormPlanOptions,
    ) -> Result<LayerNormPlan> {
        check_device(OP, &self.device, device)?;
        config.validate()?;
        let (rows, width) = config.rows_and_width(shape)?;
        let lanes = options.lanes(OP, device, rows, width)?;
        let limits = BindLimits::of(device);
        let row_bytes = width * self.storage.element_bytes();
        let ranges = bind_ranges(OP, "one row in bytes", rows, row_bytes, &limits, 1)?;
        if matches!(fusion, LayerNormFusion::ResidualDropout(_)) && !residual_fits(device) {
            return Err(residual_limit(OP, RESIDUAL_PASS, device));
        }
        let dropout = match fusion {
            LayerNormFusion::None => None,
            LayerNormFusion::Dropout(d) | LayerNormFusion::ResidualDropout(d) => Some(d),
        };
        let mut flags = 0;
        if config.has_weight() {
            flags |= FLAG_WEIGHT;
        }
        if config.has_bias() {
            flags |= FLAG_BIAS;
        }
        let subgroup_possible = self.subgroup.as_ref().is_some_and(|sg| {
            let (entry, flags) = crate::kernels::cpu::layer_norm_rows_forward_entry(fusion, SG_TRIPLES[0]);
            sg.find(entry, &flags).is_some()
        });
        let path = row_path(lanes, subgroup_possible, width, options.subgroup_rows)?;
        let rows_per_workgroup = if path.blocks() {
            BLOCK_ROWS
        } else {
            u64::from(256 / lanes)
        };
        let uniform = |range: &BindRange, training: bool| -> Result<wgpu::Buffer> {
            let d = match dropout {
                Some(d) => d.params(training)?,
                None => crate::kernels::dropout::DropParams {
                    threshold: 0,
                    flags: 0,
                    scale: 1.0,
                },
            };
            let params = LnParams {
                rows: range.count as u32,
                width: width as u32,
                flags,
                eps: config.eps,
                drop_threshold: d.threshold,
                drop_flags: d.flags,
                drop_scale: d.scale,
                lanes,
                row_base: range.start as u32,
                _pad: [0; 3],
            };
            Ok(uniform_buffer(device, "layer_norm params", &params))
        };
        let mut parts = Vec::with_capacity(ranges.len());
        for range in &ranges {
            parts.push(LnRange {
                range: *range,
                uniforms: [uniform(range, false)?, uniform(range, true)?],
                groups: fold_workgroups(
                    OP,
                    range.count.div_ceil(rows_per_workgroup),
                    limits.max_workgroups_per_dim,
                )?,
            });
        }
        Ok(LayerNormPlan {
            kernel: self.clone(),
            config: config.clone(),
            fusion,
            shape: shape.to_vec(),
            rows,
            width,
            path,
            limits,
            ranges: parts,
        })
    }
}

/// The buffers of one LayerNorm call; distinct buffers for inputs and outputs. Activations
/// (`x`, `y`, `residual`, `h`) are stored as the kernel's [`Storage`]; γ, β, mean and rstd are
/// f32.
#[derive(Clone, Debug)]
pub struct LayerNormBuffers<'a> {
    /// Input `(*, normalized_shape)`.
    pub x: wgpu::BufferSlice<'a>,
    /// Output, same shape.
    pub y: wgpu::BufferSlice<'a>,
    /// γ, `normalized_shape`; required when `elementwise_affine`.
    pub weight: Option<wgpu::BufferSlice<'a>>,
    /// β, `normalized_shape`; required when `elementwise_affine && bias`.
    pub bias: Option<wgpu::BufferSlice<'a>>,
    /// Output `(rows)`: the row means.
    pub mean: wgpu::BufferSlice<'a>,
    /// Output `(rows)`: `1/sqrt(var + eps)` per row.
    pub rstd: wgpu::BufferSlice<'a>,
    /// Generator state (16 bytes); required with dropout fusion.
    pub rng: Option<wgpu::BufferSlice<'a>>,
    /// Residual input, same shape as `x`; required with [`LayerNormFusion::ResidualDropout`].
    pub residual: Option<wgpu::BufferSlice<'a>>,
    /// Output `h = residual + dropout(x)`; required with [`LayerNormFusion::ResidualDropout`].
    pub h: Option<wgpu::BufferSlice<'a>>,
}

/// A LayerNorm for one shape, configuration and fusion.
#[derive(Debug)]
pub struct LayerNormPlan {
    kernel: LayerNormKernel,
    config: LayerNormConfig,
    fusion: LayerNormFusion,
    shape: Vec<usize>,
    rows: u64,
    width: u64,
    /// How rows are walked (see [`RowPath`]).
    path: RowPath,
    limits: BindLimits,
    /// Row ranges, one per storage binding's worth of rows (one unless the tensor exceeds
    /// `max_storage_buffer_binding_size`).
    ranges: Vec<LnRange>,
}

/// One row range of a LayerNorm plan: its uniforms ([eval, train]) and workgroups.
#[derive(Debug)]
struct LnRange {
    range: BindRange,
    uniforms: [wgpu::Buffer; 2],
    groups: (u32, u32),
}

fn required<'s, 'a>(
    what: &'static str,
    s: &'s Option<wgpu::BufferSlice<'a>>,
    because: &str,
) -> Result<&'s wgpu::BufferSlice<'a>> {
    s.as_ref().ok_or_else(|| Error::Buffer {
        op: OP,
        what,
        reason: format!("is required {because}"),
    })
}

impl LayerNormPlan {
    /// How the activations this plan reads and writes are stored (its kernel's storage).
    pub fn storage(&self) -> Storage {
        self.kernel.storage
    }

    /// The input shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Rows (product of the leading dims).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Row width W.
    pub fn width(&self) -> u64 {
        self.width
    }

    /// The fusion.
    pub fn fusion(&self) -> LayerNormFusion {
        self.fusion
    }

    /// Whether the plan takes the row-per-subgroup forward (see
    /// [`LayerNormPlanOptions::subgroup_rows`]) for calls whose buffers bind as 16-byte vectors.
    pub fn subgroup_rows(&self) -> bool {
        matches!(self.path, RowPath::SubgroupRows { .. })
    }

    /// Binding ranges each call dispatches: 1 unless the tensor exceeds one storage binding.
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }

    /// Checks the buffers without recording anything.
    pub fn validate(&self, b: &LayerNormBuffers<'_>) -> Result<()> {
        self.args(b).map(|_| ())
    }

    /// Checks every buffer of a call and returns them as the call's arguments.
    fn args<'s, 'a>(&self, b: &'s LayerNormBuffers<'a>) -> Result<CallArgs<'s, 'a>> {
        let eb = self.kernel.storage.element_bytes();
        let (x_bytes, w_bytes, r_bytes) = (self.rows * self.width * eb, self.width * 4, self.rows * 4);
        let mut args = CallArgs::new(OP, &self.limits);
        args.read_ranged("x", &b.x, x_bytes)?;
        args.write_ranged("y", &b.y, x_bytes)?;
        args.write("mean", &b.mean, r_bytes)?;
        args.write("rstd", &b.rstd, r_bytes)?;
        if self.config.has_weight() {
            let w = required("weight", &b.weight, "when elementwise_affine is set")?;
            args.read("weight", w, w_bytes)?;
        }
        if self.config.has_bias() {
            let bi = required("bias", &b.bias, "when elementwise_affine and bias are set")?;
            args.read("bias", bi, w_bytes)?;
        }
        if self.fusion != LayerNormFusion::None {
            let rng = required("rng", &b.rng, "with dropout fusion")?;
            args.read("rng", rng, RNG_STATE_BYTES)?;
        }
        if let LayerNormFusion::ResidualDropout(_) = self.fusion {
            let res = required("residual", &b.residual, "with residual fusion")?;
            let h = required("h", &b.h, "with residual fusion")?;
            args.read_ranged("residual", res, x_bytes)?;
            args.write_ranged("h", h, x_bytes)?;
        }
        args.check_aliasing()?;
        Ok(args)
    }

    /// Records the LayerNorm (and its fused dropout) into `encoder`. `training` selects the
    /// dropout's train or eval behaviour; LayerNorm itself is the same in both. Does not
    /// advance the generator. Checks everything first: on error nothing is recorded.
    pub fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        training: bool,
        b: &LayerNormBuffers<'_>,
    ) -> Result<()> {
        check_device(OP, &self.kernel.device, device)?;
        let args = self.args(b)?;
        args.record(device, encoder, "layer_norm forward", || {
            self.dispatches(device, training, b)
        })
    }

    /// The dispatches of one call, with their bind groups.
    fn dispatches<'p>(
        &'p self,
        device: &wgpu::Device,
        training: bool,
        b: &LayerNormBuffers<'_>,
    ) -> Result<Vec<Dispatch<'p>>> {
        let k = &self.kernel;
        let row_bytes = self.width * k.storage.element_bytes();
        let (w_bytes, r_bytes) = (self.width * 4, self.rows * 4);
        let weight = binding_or(self.config.has_weight(), &b.weight, &k.placeholders[0], w_bytes);
        let bias = binding_or(self.config.has_bias(), &b.bias, &k.placeholders[1], w_bytes);
        let mut activations = vec![&b.x, &b.y];
        if let (LayerNormFusion::ResidualDropout(_), Some(res), Some(h)) = (self.fusion, &b.residual, &b.h) {
            activations.extend([res, h]);
        }
        // The vec4 variant also reads γ and β as vectors.
        let params: Vec<_> = [(self.config.has_weight(), &b.weight), (self.config.has_bias(), &b.bias)]
            .into_iter()
            .filter_map(|(used, s)| s.as_ref().filter(|_| used))
            .collect();
        let vec4 = self.width.is_multiple_of(4) && vec4_bindable(&params, 0, w_bytes);
        let mut dispatches = Vec::with_capacity(self.ranges.len());
        for c in &self.ranges {
            let (at, len) = (c.range.start * row_bytes, c.range.count * row_bytes);
            let vec4_passes = k.vec4.as_ref().filter(|_| vec4 && vec4_bindable(&activations, at, len));
            let passes = vec4_passes.unwrap_or(&k.passes);
            let path = self.path.for_range(vec4_passes.is_some());
            let (passes, (entry, flags)) = match (path, &k.subgroup) {
                (RowPath::SubgroupRows { triples }, Some(sg)) => (
                    sg,
                    crate::kernels::cpu::layer_norm_rows_forward_entry(self.fusion, triples),
                ),
                _ => (passes, forward_entry(self.fusion, path.blocks())),
            };
            // Absent only for the residual pass on a device below its binding count, which plan
            // creation refuses; a plan used with another device's kernel lands here.
            let pipeline = passes
                .find(entry, &flags)
                .ok_or_else(|| residual_limit(OP, RESIDUAL_PASS, device))?;
            let mut entries = vec![
                (0, c.uniforms[usize::from(training)].as_entire_binding()),
                (1, binding_at(&b.x, at, len)),
                (2, binding_at(&b.y, at, len)),
                (3, weight.clone()),
                (4, bias.clone()),
                (5, binding(&b.mean, r_bytes)),
                (6, binding(&b.rstd, r_bytes)),
            ];
            // layer_norm_forward shares its code with ln_dropout_forward, so its layout holds the
            // generator state too: the placeholder stands in without dropout.
            let dropout = self.fusion != LayerNormFusion::None;
            entries.push((7, binding_or(dropout, &b.rng, &k.placeholders[2], RNG_STATE_BYTES)));
            if let (LayerNormFusion::ResidualDropout(_), Some(res), Some(h)) = (self.fusion, &b.residual, &b.h) {
                entries.push((8, binding_at(res, at, len)));
                entries.push((9, binding_at(h, at, len)));
            }
            dispatches.push((pipeline, bind_group(device, "layer_norm", pipeline, &entries), c.groups));
        }
        Ok(dispatches)
    }
}

/// Whether `device` can bind the residual passes' storage buffers (forward and backward): the
/// kernels build those pipelines, and plans accept the residual fusion, only then.
pub(crate) fn residual_fits(device: &wgpu::Device) -> bool {
    device.limits().max_storage_buffers_per_shader_stage >= RESIDUAL_STORAGE_BINDINGS
}

/// The residual block's pass `what` of `op` binds more storage buffers than `device` allows.
pub(crate) fn residual_limit(op: &'static str, what: &'static str, device: &wgpu::Device) -> Error {
    Error::ExceedsLimit {
        op,
        what,
        value: u64::from(RESIDUAL_STORAGE_BINDINGS),
        limit: u64::from(device.limits().max_storage_buffers_per_shader_stage),
        limit_name: "max_storage_buffers_per_shader_stage",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_lanes_fill_registers_on_gpus_and_threads_on_cpus() {
        let gpu = |rows, width| default_lanes(wgpu::DeviceType::DiscreteGpu, rows, width, 2);
        assert_eq!(gpu(1, 1), 8);
        assert_eq!(gpu(8192, 768), 64); // 16·64 >= 768
        assert_eq!(gpu(4096, 4096), 256);
        assert_eq!(gpu(2, 100_000), 256);
        assert_eq!(default_lanes(wgpu::DeviceType::IntegratedGpu, 1 << 20, 1024, 64), 64);
        let cpu = |rows, width, threads| default_lanes(wgpu::DeviceType::Cpu, rows, width, threads);
        assert_eq!(cpu(1024, 768, 2), 1); // 16 blocks of 64 rows: four per thread
        assert_eq!(cpu(1024, 768, 8), 1);
        assert_eq!(cpu(255, 768, 2), 1); // 4 blocks, the last one partial
        assert_eq!(cpu(192, 768, 2), 8); // 3 blocks < 4: 6 workgroups of 32 rows
        assert_eq!(cpu(1024, 768, 16), 8); // 32 workgroups of 32 rows
        assert_eq!(cpu(128, 4096, 2), 8); // 4 workgroups of 32 rows
        assert_eq!(cpu(3, 100_000, 2), 256); // never more than the GPU's choice
        assert_eq!(cpu(3, 8, 2), 8);
        assert_eq!(cpu(1 << 20, 8, 64), 1);
    }
}
