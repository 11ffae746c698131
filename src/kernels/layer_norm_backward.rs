//! LayerNorm backward, low level, including the backward of its dropout fusions:
//! [`LayerNormBackwardKernel`] and [`LayerNormBackwardPlan`]. See
//! `shaders/layer_norm/backward.wgsl` for the formulas.
//!
//! | dispatch                              | workgroups             | writes                       |
//! |---------------------------------------|------------------------|------------------------------|
//! | `layer_norm_backward_dx`              | rows · lanes / 256     | dx, row centre               |
//! | (`layer_norm_backward_residual_dx`)   |                        | (+ dresidual)                |
//! | `layer_norm_backward_params_partial`  | ⌈W/1024⌉ · ⌈rows/64⌉   | per-block partial dγ, dβ     |
//! | `layer_norm_backward_params_final`    | ⌈W/256⌉                | dγ, dβ                       |
//!
//! The dx and partial passes take the fused dropout as the `DROPOUT` override, the dx passes
//! writing or adding to dx as `ACCUMULATE`.
//!
//! With one lane per row (the CPU-adapter default, [`crate::tuning::default_lanes`]) the first
//! two rows are one pass from `shaders/cpu/layer_norm/backward_blocks.wgsl`,
//! `layer_norm_backward_block_dx` (or `_block_residual_dx`): ⌈rows/64⌉ workgroups of 64
//! invocations write dx (+ dresidual) and the per-block partial dγ, dβ. Before it, with γ,
//! `layer_norm_backward_gamma_stage` (⌈min(W, 4096)/256⌉ workgroups) copies γ into the plan's
//! uniform buffer, which the pass's row phase reads instead of the storage binding. On CPU
//! adapters with `SUBGROUP` that pass is a row per subgroup instead (`kernels::cpu`).

use wgpu::util::DeviceExt;

use crate::context::Kernel;
use crate::error::{Error, Result};
use crate::grad::Accumulate;
use crate::kernels::cpu::SG_TRIPLES;
use crate::kernels::dropout::{DropParams, RNG_STATE_BYTES};
use crate::kernels::layer_norm::{
    norm_constants, residual_fits, residual_limit, row_path, LayerNormConfig, LayerNormFusion, LayerNormPlanOptions,
    RowPath,
};
use crate::kernels::{
    bind_group, bind_ranges, binding, binding_at, binding_or, check_device, fold_workgroups, placeholder,
    uniform_buffer, vec4_bindable, vec4_module, BindLimits, BindRange, CallArgs, Dispatch, Flag, Pipelines, Storage,
};

const OP: &str = "layer_norm backward";
const WORKGROUP: u64 = 256;
const ROWS_PER_BLOCK: u64 = 64;
const RESIDUAL_PASS: &str = "storage buffers of the fused residual backward pass";
/// Columns of γ in the uniform copy the row-block pass reads (`GAMMA_QUADS` quads in the
/// shader): 16 KiB, the smallest `max_uniform_buffer_binding_size` wgpu allows.
const GAMMA_UNIFORM_COLUMNS: u64 = 4096;

/// Entry points in `shaders/layer_norm/backward.wgsl` that get a pipeline. The dx and partial
/// passes take the fused dropout as the `DROPOUT` override and writing or adding to dx as
/// `ACCUMULATE`.
pub(crate) const ENTRY_POINTS: &[&str] = &[
    "layer_norm_backward_dx",
    "layer_norm_backward_residual_dx",
    "layer_norm_backward_params_partial",
    "layer_norm_backward_params_final",
];

const FLAG_WEIGHT: u32 = 1;
const FLAG_BIAS: u32 = 2;
const FLAG_ACCUM_DX: u32 = 4;
const FLAG_ACCUM_PARAMS: u32 = 8;
const FLAG_DH_IN: u32 = 32;

/// Mirrors `struct Params` in `shaders/layer_norm/backward.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct LnBackwardParams {
    rows: u32,
    width: u32,
    flags: u32,
    row_blocks: u32,
    drop_threshold: u32,
    drop_flags: u32,
    drop_scale: f32,
    col_tiles: u32,
    lanes: u32,
    row_base: u32,
    block_base: u32,
    total_blocks: u32,
}
const _: () = assert!(std::mem::size_of::<LnBackwardParams>() == 48);

/// Compiled LayerNorm backward pipelines for one device and activation storage.
#[derive(Clone, Debug)]
pub struct LayerNormBackwardKernel {
    device: wgpu::Device,
    storage: Storage,
    /// Every entry point of `layer_norm/backward.wgsl` with the flags a plan can take. The
    /// residual block's dx passes bind 9 storage buffers and exist only where
    /// `max_storage_buffers_per_shader_stage` allows (WebGPU's default is 8); elsewhere a
    /// residual plan is refused.
    passes: Pipelines,
    /// The per-range passes from the vec4 variant (f32 only), for rows of whole quads
    /// (W % 4 == 0) whose activations bind as whole 16-byte vectors.
    vec4: Option<Pipelines>,
    /// Stand-ins: γ, dγ, dβ, rng, dh_in.
    placeholders: [wgpu::Buffer; 5],
    /// The row-per-subgroup dx passes (vec4 variant) for every [`SG_TRIPLES`]: built on CPU
    /// adapters with `SUBGROUP` of at least 8 lanes and f32 storage only; the residual block's
    /// only where its 9 storage buffers fit.
    subgroup: Option<Pipelines>,
}

/// The dx pass's entry point and flags: the lane path or the row-block path (`blocks`), the
/// residual block's or not, with the dropout's mask on dy (`drop_dy`), adding to dx or not.
fn dx_entry(blocks: bool, residual: bool, drop_dy: bool, accumulate: bool) -> (&'static str, Vec<Flag>) {
    let acc = ("ACCUMULATE", accumulate.into());
    match (blocks, residual) {
        (false, false) => ("layer_norm_backward_dx", vec![("DROPOUT", drop_dy.into()), acc]),
        (true, false) => ("layer_norm_backward_block_dx", vec![("DROPOUT", drop_dy.into()), acc]),
        (false, true) => ("layer_norm_backward_residual_dx", vec![acc]),
        (true, true) => ("layer_norm_backward_block_residual_dx", vec![acc]),
    }
}

impl Kernel for LayerNormBackwardKernel {
    fn build(device: &wgpu::Device, storage: Storage) -> Self {
        Self::build_with(device, storage, false)
    }
}

impl LayerNormBackwardKernel {
    /// LayerNorm's backward pipelines, or with `rms` RMSNorm's (see
    /// [`LayerNormKernel::build_with`](crate::kernels::layer_norm::LayerNormKernel)).
    pub(crate) fn build_with(device: &wgpu::Device, storage: Storage, rms: bool) -> Self {
        // The lane path's per-range pipelines and, beside them, the row-block path's (CPU
        // adapters' default, but built everywhere: a plan may ask for one lane per row on any
        // device).
        let per_range = |module: &wgpu::ShaderModule, vec4: bool| {
            let mut p = Pipelines::with_fixed(norm_constants(rms));
            p.add_all(device, module, "layer_norm_backward_dx", &["DROPOUT", "ACCUMULATE"]);
            p.add_all(device, module, "layer_norm_backward_params_partial", &["DROPOUT"]);
            if residual_fits(device) {
                p.add_all(device, module, "layer_norm_backward_residual_dx", &["ACCUMULATE"]);
            }
            crate::kernels::cpu::add_layer_norm_blocks_backward(&mut p, device, storage, vec4);
            p
        };
        let module = crate::kernels::shader_module(device, "layer_norm/backward.wgsl", storage, false);
        let mut passes = per_range(&module, false);
        passes.add_all(device, &module, "layer_norm_backward_params_final", &[]);
        Self {
            device: device.clone(),
            storage,
            passes,
            vec4: vec4_module(device, "layer_norm/backward.wgsl", storage).map(|m| per_range(&m, true)),
            placeholders: std::array::from_fn(|_| placeholder(device, "layer_norm backward placeholder")),
            subgroup: crate::kernels::cpu::layer_norm_rows_backward(device, storage, norm_constants(rms)),
        }
    }
}

storage_constructors!(LayerNormBackwardKernel, "x, dy, dx, dh_in, dresidual");

impl LayerNormBackwardKernel {
    /// A backward plan for the forward of `shape`, `config` and `fusion`. `dropout_training`
    /// is the mode the forward's dropout ran in (eval keeps every element at the eval scale).
    pub fn plan(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &LayerNormConfig,
        fusion: LayerNormFusion,
        dropout_training: bool,
    ) -> Result<LayerNormBackwardPlan> {
        self.plan_with(
            device,
            shape,
            config,
            fusion,
            dropout_training,
            &LayerNormPlanOptions::default(),
        )
    }

    /// [`Self::plan`] with geometry overrides for the dx pass (see [`LayerNormPlanOptions`]).
    pub fn plan_with(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &LayerNormConfig,
        fusion: LayerNormFusion,
        dropout_training: bool,
        options: &LayerNormPlanOptions,
    ) -> Result<LayerNormBackwardPlan> {
        check_device(OP, &self.device, device)?;
        config.validate()?;
        let (rows, width) = config.rows_and_width(shape)?;
        let lanes = options.lanes(OP, device, rows, width)?;
        let limits = BindLimits::of(device);
        let row_bytes = width * self.storage.element_bytes();
        // Ranges hold whole 64-row blocks, so the dγ/dβ partial pass ranges with them.
        let ranges = bind_ranges(OP, "64 rows in bytes", rows, row_bytes, &limits, ROWS_PER_BLOCK)?;
        if matches!(fusion, LayerNormFusion::ResidualDropout(_)) && !residual_fits(device) {
            return Err(residual_limit(OP, RESIDUAL_PASS, device));
        }
        let subgroup_possible = self.subgroup.as_ref().is_some_and(|sg| {
            let residual = matches!(fusion, LayerNormFusion::ResidualDropout(_));
            let (entry, flags) =
                crate::kernels::cpu::layer_norm_rows_backward_entry(residual, false, false, SG_TRIPLES[0]);
            sg.find(entry, &flags).is_some()
        });
        let path = row_path(lanes, subgroup_possible, width, options.subgroup_rows)?;
        let row_blocks = rows.div_ceil(ROWS_PER_BLOCK);
        // The partial pass takes 4 columns per invocation; the final pass one.
        let col_tiles = width.div_ceil(4 * WORKGROUP);
        let partial_bytes = row_blocks * width * 8;
        limits.check_size(OP, "dγ/dβ partials in bytes", partial_bytes)?;
        let d = match fusion {
            LayerNormFusion::None => DropParams {
                threshold: 0,
                flags: 0,
                scale: 1.0,
            },
            LayerNormFusion::Dropout(d) | LayerNormFusion::ResidualDropout(d) => d.params(dropout_training)?,
        };
        let mut base_flags = 0;
        if config.has_weight() {
            base_flags |= FLAG_WEIGHT;
        }
        if config.has_bias() {
            base_flags |= FLAG_BIAS;
        }
        // Per range, one uniform per (accumulate dx, accumulate params, dh_in) combination.
        let range_uniforms = |range: &BindRange| -> Vec<wgpu::Buffer> {
            (0..8usize)
                .map(|variant| {
                    let mut flags = base_flags;
                    for (bit, flag) in [(1, FLAG_ACCUM_DX), (2, FLAG_ACCUM_PARAMS), (4, FLAG_DH_IN)] {
                        if variant & bit != 0 {
                            flags |= flag;
                        }
                    }
                    let params = LnBackwardParams {
                        rows: range.count as u32,
                        width: width as u32,
                        flags,
                        row_blocks: range.count.div_ceil(ROWS_PER_BLOCK) as u32,
                        drop_threshold: d.threshold,
                        drop_flags: d.flags,
                        drop_scale: d.scale,
                        col_tiles: col_tiles as u32,
                        lanes,
                        row_base: range.start as u32,
                        block_base: (range.start / ROWS_PER_BLOCK) as u32,
                        total_blocks: row_blocks as u32,
                    };
                    uniform_buffer(device, "layer_norm backward params", &params)
                })
                .collect()
        };
        let mut parts = Vec::with_capacity(ranges.len());
        for range in &ranges {
            let max = limits.max_workgroups_per_dim;
            // The row-block path (one lane) runs a workgroup per 64-row block.
            let rows_per_group = if lanes == 1 {
                ROWS_PER_BLOCK
            } else {
                u64::from(256 / lanes)
            };
            parts.push(LnbRange {
                range: *range,
                uniforms: range_uniforms(range),
                dx_groups: fold_workgroups(OP, range.count.div_ceil(rows_per_group), max)?,
                partial_groups: fold_workgroups(OP, range.count.div_ceil(ROWS_PER_BLOCK) * col_tiles, max)?,
            });
        }
        let scratch = |label: &str, bytes: u64| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes.max(8),
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        Ok(LayerNormBackwardPlan {
            kernel: self.clone(),
            config: config.clone(),
            fusion,
            dropout_training,
            shape: shape.to_vec(),
            rows,
            width,
            path,
            limits,
            ranges: parts,
            // Only the row pass publishes row centres (for the partial pass); the row-block
            // pass keeps them in workgroup memory.
            row_centre: scratch("layer_norm backward row centres", if lanes == 1 { 0 } else { rows * 8 }),
            partials: scratch("layer_norm backward partials", partial_bytes),
            final_groups: fold_workgroups(OP, width.div_ceil(WORKGROUP), limits.max_workgroups_per_dim)?,
            // Bound by every dx pass (their layouts share the row-sum helpers), read only by the
            // row-block path. Without γ it holds ones from here on; with γ, `layer_norm_backward_gamma_stage`
            // copies it in at every call (γ changes between steps).
            gamma_uniform: device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("layer_norm backward γ uniform copy"),
                contents: bytemuck::cast_slice(&[1.0f32; GAMMA_UNIFORM_COLUMNS as usize]),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::STORAGE,
            }),
        })
    }
}

/// The buffers of one LayerNorm backward. Activations and their gradients (`x`, `dy`, `dx`,
/// `dh_in`, `dresidual`) are stored as the kernel's [`Storage`]; the rest is f32.
#[derive(Clone, Debug)]
pub struct LayerNormBackwardBuffers<'a> {
    /// The forward's LayerNorm input, unchanged since the forward: `x`, or the saved `h` of
    /// the residual block.
    pub x: wgpu::BufferSlice<'a>,
    /// Gradient of the forward's output `y`.
    pub dy: wgpu::BufferSlice<'a>,
    /// Output: `dL/dx` (for the residual block, the gradient of the dropout's input).
    pub dx: wgpu::BufferSlice<'a>,
    /// γ; required when `elementwise_affine`.
    pub weight: Option<wgpu::BufferSlice<'a>>,
    /// The forward's saved rstd, `(rows)`.
    pub rstd: wgpu::BufferSlice<'a>,
    /// Output `dL/dγ`; required when there is γ.
    pub dweight: Option<wgpu::BufferSlice<'a>>,
    /// Output `dL/dβ`; required when there is β.
    pub dbias: Option<wgpu::BufferSlice<'a>>,
    /// The forward's generator state; required with a dropout fusion.
    pub rng: Option<wgpu::BufferSlice<'a>>,
    /// Residual block: extra gradient reaching `h` from elsewhere (optional).
    pub dh_in: Option<wgpu::BufferSlice<'a>>,
    /// Residual block: output `dL/dresidual` (= dh); required there.
    pub dresidual: Option<wgpu::BufferSlice<'a>>,
}

/// A LayerNorm backward for one shape, configuration and fusion.
#[derive(Debug)]
pub struct LayerNormBackwardPlan {
    kernel: LayerNormBackwardKernel,
    config: LayerNormConfig,
    fusion: LayerNormFusion,
    dropout_training: bool,
    shape: Vec<usize>,
    rows: u64,
    width: u64,
    /// How rows are walked (see [`RowPath`]); on the 64-row-block paths one pass writes dx and
    /// the dγ/dβ partials.
    path: RowPath,
    limits: BindLimits,
    /// Ranges of whole 64-row blocks, one per storage binding's worth of rows.
    ranges: Vec<LnbRange>,
    row_centre: wgpu::Buffer,
    partials: wgpu::Buffer,
    final_groups: (u32, u32),
    /// γ of the first [`GAMMA_UNIFORM_COLUMNS`] columns for the row-block pass's row phase.
    gamma_uniform: wgpu::Buffer,
}

/// One row range of a LayerNorm backward plan.
#[derive(Debug)]
struct LnbRange {
    range: BindRange,
    /// Indexed by `accumulate.dx | accumulate.params << 1 | dh_in << 2`.
    uniforms: Vec<wgpu::Buffer>,
    dx_groups: (u32, u32),
    partial_groups: (u32, u32),
}

impl LayerNormBackwardPlan {
    /// How the activations this plan reads and writes are stored (its kernel's storage).
    pub fn storage(&self) -> Storage {
        self.kernel.storage
    }

    /// The input shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The forward fusion this plan differentiates.
    pub fn fusion(&self) -> LayerNormFusion {
        self.fusion
    }

    /// The mode of the forward's dropout this plan differentiates.
    pub fn dropout_training(&self) -> bool {
        self.dropout_training
    }

    /// Whether the plan's dx pass is the row-per-subgroup one (see
    /// [`LayerNormPlanOptions::subgroup_rows`]) for calls whose buffers bind as 16-byte vectors.
    pub fn subgroup_rows(&self) -> bool {
        matches!(self.path, RowPath::SubgroupRows { .. })
    }

    /// Binding ranges each call dispatches: 1 unless the tensor exceeds one storage binding.
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }

    /// Checks the buffers without recording anything.
    pub fn validate(&self, b: &LayerNormBackwardBuffers<'_>) -> Result<()> {
        self.args(b).map(|_| ())
    }

    /// Checks every buffer of a call and returns them as the call's arguments.
    fn args<'s, 'a>(&self, b: &'s LayerNormBackwardBuffers<'a>) -> Result<CallArgs<'s, 'a>> {
        let eb = self.kernel.storage.element_bytes();
        let (x_bytes, w_bytes, r_bytes) = (self.rows * self.width * eb, self.width * 4, self.rows * 4);
        let mut args = CallArgs::new(OP, &self.limits);
        args.read_ranged("x", &b.x, x_bytes)?;
        args.read_ranged("dy", &b.dy, x_bytes)?;
        args.write_ranged("dx", &b.dx, x_bytes)?;
        args.read("rstd", &b.rstd, r_bytes)?;
        let required = |what: &'static str, because: &str| Error::Buffer {
            op: OP,
            what,
            reason: format!("is required {because}"),
        };
        if self.config.has_weight() {
            let w = b
                .weight
                .as_ref()
                .ok_or_else(|| required("weight", "when elementwise_affine is set"))?;
            let dw = b
                .dweight
                .as_ref()
                .ok_or_else(|| required("dweight", "when elementwise_affine is set"))?;
            args.read("weight", w, w_bytes)?;
            args.write("dweight", dw, w_bytes)?;
        }
        if self.config.has_bias() {
            let db = b
                .dbias
                .as_ref()
                .ok_or_else(|| required("dbias", "when there is a bias"))?;
            args.write("dbias", db, w_bytes)?;
        }
        if self.fusion != LayerNormFusion::None {
            let rng = b.rng.as_ref().ok_or_else(|| required("rng", "with a dropout fusion"))?;
            args.read("rng", rng, RNG_STATE_BYTES)?;
        }
        if let LayerNormFusion::ResidualDropout(_) = self.fusion {
            let dres = b
                .dresidual
                .as_ref()
                .ok_or_else(|| required("dresidual", "for the residual block"))?;
            args.write_ranged("dresidual", dres, x_bytes)?;
            if let Some(dh) = &b.dh_in {
                args.read_ranged("dh_in", dh, x_bytes)?;
            }
        }
        args.check_aliasing()?;
        Ok(args)
    }

    /// Records the backward. Checks everything first: on error nothing is recorded.
    pub fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        accumulate: Accumulate,
        b: &LayerNormBackwardBuffers<'_>,
    ) -> Result<()> {
        check_device(OP, &self.kernel.device, device)?;
        let args = self.args(b)?;
        args.record(device, encoder, "layer_norm backward", || {
            self.dispatches(device, accumulate, b)
        })
    }

    /// The dispatches of one call, with their bind groups.
    fn dispatches<'p>(
        &'p self,
        device: &wgpu::Device,
        accumulate: Accumulate,
        b: &LayerNormBackwardBuffers<'_>,
    ) -> Result<Vec<Dispatch<'p>>> {
        let k = &self.kernel;
        let ph = &k.placeholders;
        let row_bytes = self.width * k.storage.element_bytes();
        let (w_bytes, r_bytes) = (self.width * 4, self.rows * 4);
        let residual = matches!(self.fusion, LayerNormFusion::ResidualDropout(_));
        let has_dh = residual && b.dh_in.is_some();
        let variant = usize::from(accumulate.dx) | usize::from(accumulate.params) << 1 | usize::from(has_dh) << 2;
        let rstd = binding(&b.rstd, r_bytes);
        // LayerNorm → dropout applies the mask to dy in both the dx and the partial pass (the
        // `DROPOUT` flag); the residual block applies it to dh in its dx pass. Every
        // entry point's layout holds the generator state (the paths share helpers), so it is
        // always bound: the placeholder without dropout.
        let drop_dy = matches!(self.fusion, LayerNormFusion::Dropout(_));
        let rng = binding_or(self.fusion != LayerNormFusion::None, &b.rng, &ph[3], RNG_STATE_BYTES);
        let (centre, partials) = (self.row_centre.as_entire_binding(), self.partials.as_entire_binding());
        let mut activations = vec![&b.x, &b.dy, &b.dx];
        if residual {
            activations.extend(b.dh_in.iter().chain(&b.dresidual));
        }
        // The vec4 variant also reads γ as vectors.
        let weight: Vec<_> = b.weight.iter().filter(|_| self.config.has_weight()).collect();
        let vec4 = self.width.is_multiple_of(4) && vec4_bindable(&weight, 0, w_bytes);
        let params = self.config.has_weight() || self.config.has_bias();
        let mut dx_passes = Vec::new();
        let mut partial_passes = Vec::new();
        // Whether a row-block dx pass reads the uniform copy of γ.
        let mut stages_gamma = false;
        for c in &self.ranges {
            let uniform = c.uniforms[variant].as_entire_binding();
            let (at, len) = (c.range.start * row_bytes, c.range.count * row_bytes);
            let vec4_passes = k.vec4.as_ref().filter(|_| vec4 && vec4_bindable(&activations, at, len));
            let passes = vec4_passes.unwrap_or(&k.passes);
            // The row-per-subgroup pass where the plan has one and this range binds as vectors.
            let path = self.path.for_range(vec4_passes.is_some());
            let (dx_set, (entry, flags)) = match (path, &k.subgroup) {
                (RowPath::SubgroupRows { triples }, Some(sg)) => (
                    sg,
                    crate::kernels::cpu::layer_norm_rows_backward_entry(residual, drop_dy, accumulate.dx, triples),
                ),
                _ => (passes, dx_entry(path.blocks(), residual, drop_dy, accumulate.dx)),
            };
            // The residual pipelines are absent only on a device below their binding count,
            // which plan creation refuses; a plan used with another device's kernel lands here.
            let dx_pipeline = dx_set
                .find(entry, &flags)
                .ok_or_else(|| residual_limit(OP, RESIDUAL_PASS, device))?;
            stages_gamma |= path == RowPath::Blocks;
            let partial_pipeline = passes.get("layer_norm_backward_params_partial", &[("DROPOUT", drop_dy.into())])?;
            let (x, dy) = (binding_at(&b.x, at, len), binding_at(&b.dy, at, len));
            let mut dx_entries = vec![
                (0, uniform.clone()),
                (1, x.clone()),
                (2, dy.clone()),
                (3, binding_at(&b.dx, at, len)),
                (4, binding_or(self.config.has_weight(), &b.weight, &ph[0], w_bytes)),
                (5, rstd.clone()),
                (10, rng.clone()),
            ];
            // The subgroup pass keeps γ in registers; the others bind the uniform copy.
            if !matches!(path, RowPath::SubgroupRows { .. }) {
                dx_entries.push((13, self.gamma_uniform.as_entire_binding()));
            }
            // The row-block pass writes the partials; the row pass the row centres for the
            // partial pass.
            dx_entries.push(if path.blocks() {
                (7, partials.clone())
            } else {
                (6, centre.clone())
            });
            if residual {
                let dh_in = match &b.dh_in {
                    Some(dh) => binding_at(dh, at, len),
                    None => ph[4].as_entire_binding(),
                };
                dx_entries.push((11, dh_in));
                if let Some(dres) = &b.dresidual {
                    dx_entries.push((12, binding_at(dres, at, len)));
                }
            }
            dx_passes.push((
                dx_pipeline,
                bind_group(device, "layer_norm_backward_dx", dx_pipeline, &dx_entries),
                c.dx_groups,
            ));
            // Without γ and β there is nothing to reduce; the row-block pass sums the partials
            // itself.
            if params && !path.blocks() {
                let partial_entries = [
                    (0, uniform),
                    (1, x),
                    (2, dy),
                    (5, rstd.clone()),
                    (6, centre.clone()),
                    (7, partials.clone()),
                    (10, rng.clone()),
                ];
                partial_passes.push((
                    partial_pipeline,
                    bind_group(
                        device,
                        "layer_norm_backward_params_partial",
                        partial_pipeline,
                        &partial_entries,
                    ),
                    c.partial_groups,
                ));
            }
        }
        let mut passes = Vec::new();
        // γ into the row-block pass's uniform copy (validate made γ present with a weight).
        if let Some(w) = b.weight.as_ref().filter(|_| stages_gamma && self.config.has_weight()) {
            let gamma_stage = k.passes.get("layer_norm_backward_gamma_stage", &[])?;
            passes.push((
                gamma_stage,
                bind_group(
                    device,
                    "layer_norm_backward_gamma_stage",
                    gamma_stage,
                    &[
                        (0, self.ranges[0].uniforms[variant].as_entire_binding()),
                        (4, binding(w, w_bytes)),
                        (14, self.gamma_uniform.as_entire_binding()),
                    ],
                ),
                (self.width.min(GAMMA_UNIFORM_COLUMNS).div_ceil(WORKGROUP) as u32, 1),
            ));
        }
        passes.extend(dx_passes);
        // Without γ and β only the dx passes run.
        if params {
            passes.extend(partial_passes);
            let params_final = k.passes.get("layer_norm_backward_params_final", &[])?;
            passes.push((
                params_final,
                bind_group(
                    device,
                    "layer_norm_backward_params_final",
                    params_final,
                    &[
                        (0, self.ranges[0].uniforms[variant].as_entire_binding()),
                        (7, partials),
                        (8, binding_or(self.config.has_weight(), &b.dweight, &ph[1], w_bytes)),
                        (9, binding_or(self.config.has_bias(), &b.dbias, &ph[2], w_bytes)),
                    ],
                ),
                self.final_groups,
            ));
        }
        Ok(passes)
    }
}
