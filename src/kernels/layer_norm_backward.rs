//! LayerNorm backward, low level, including the backward of its dropout fusions:
//! [`LayerNormBackwardKernel`] and [`LayerNormBackwardPlan`]. See
//! `shaders/layer_norm_backward.wgsl` for the formulas.
//!
//! | dispatch                        | workgroups                 | writes                      |
//! |---------------------------------|----------------------------|-----------------------------|
//! | `lnb_dx` / `lnb_residual_dx`    | rows                       | dx (+ dresidual), row centre|
//! | `lnb_params_partial`            | ⌈W/256⌉ · ⌈rows/64⌉        | per-block partial dγ, dβ    |
//! | `lnb_params_final`              | ⌈W/256⌉                    | dγ, dβ                      |

use crate::context::Kernel;
use crate::error::{Error, Result};
use crate::kernels::batch_norm_backward::Accumulate;
use crate::kernels::dropout::{check_rng, DropParams, RNG_STATE_BYTES};
use crate::kernels::layer_norm::{LayerNormConfig, LayerNormFusion};
use crate::kernels::{
    bind_group, binding, binding_or, check_distinct, compute_pipeline, fold_workgroups, placeholder, record,
    uniform_buffer, BindLimits,
};

const OP: &str = "layer_norm backward";
const WORKGROUP: u64 = 256;
const ROWS_PER_BLOCK: u64 = 64;
const RESIDUAL_STORAGE_BINDINGS: u32 = 9;

/// Entry points in `shaders/layer_norm_backward.wgsl` that get a pipeline.
pub(crate) const ENTRY_POINTS: &[&str] = &["lnb_dx", "lnb_residual_dx", "lnb_params_partial", "lnb_params_final"];

const FLAG_WEIGHT: u32 = 1;
const FLAG_BIAS: u32 = 2;
const FLAG_ACCUM_DX: u32 = 4;
const FLAG_ACCUM_PARAMS: u32 = 8;
const FLAG_DROPOUT: u32 = 16;
const FLAG_DH_IN: u32 = 32;

/// Mirrors `struct Params` in `shaders/layer_norm_backward.wgsl`.
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
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}
const _: () = assert!(std::mem::size_of::<LnBackwardParams>() == 48);

/// Compiled LayerNorm backward pipelines for one device.
#[derive(Clone, Debug)]
pub struct LayerNormBackwardKernel {
    dx: wgpu::ComputePipeline,
    residual_dx: wgpu::ComputePipeline,
    params_partial: wgpu::ComputePipeline,
    params_final: wgpu::ComputePipeline,
    /// Stand-ins: γ, dγ, dβ, rng, dh_in.
    placeholders: [wgpu::Buffer; 5],
}

impl Kernel for LayerNormBackwardKernel {
    fn build(device: &wgpu::Device) -> Self {
        let module = crate::kernels::shader_module(device, "layer_norm_backward.wgsl");
        Self {
            dx: compute_pipeline(device, &module, "lnb_dx"),
            residual_dx: compute_pipeline(device, &module, "lnb_residual_dx"),
            params_partial: compute_pipeline(device, &module, "lnb_params_partial"),
            params_final: compute_pipeline(device, &module, "lnb_params_final"),
            placeholders: std::array::from_fn(|_| placeholder(device, "layer_norm backward placeholder")),
        }
    }
}

impl LayerNormBackwardKernel {
    /// Compiles the pipelines.
    pub fn new(device: &wgpu::Device) -> Self {
        <Self as Kernel>::build(device)
    }

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
        config.validate()?;
        let (rows, width) = config.rows_and_width(shape)?;
        let limits = BindLimits::of(device);
        limits.check_size(OP, "input size in bytes", rows * width * 4)?;
        let storage_limit = device.limits().max_storage_buffers_per_shader_stage;
        if matches!(fusion, LayerNormFusion::ResidualDropout(_)) && storage_limit < RESIDUAL_STORAGE_BINDINGS {
            return Err(Error::ExceedsLimit {
                op: OP,
                what: "storage buffers of the fused residual backward pass",
                value: u64::from(RESIDUAL_STORAGE_BINDINGS),
                limit: u64::from(storage_limit),
                limit_name: "max_storage_buffers_per_shader_stage",
            });
        }
        let row_blocks = rows.div_ceil(ROWS_PER_BLOCK);
        let lanes = crate::kernels::layer_norm::lanes_for(width);
        let col_tiles = width.div_ceil(WORKGROUP);
        let partial_bytes = row_blocks * width * 8;
        limits.check_size(OP, "dγ/dβ partials in bytes", partial_bytes)?;
        let (d, mut base_flags) = match fusion {
            LayerNormFusion::None => (
                DropParams {
                    threshold: 0,
                    flags: 0,
                    scale: 1.0,
                },
                0,
            ),
            LayerNormFusion::Dropout(d) => (d.params(dropout_training)?, FLAG_DROPOUT),
            LayerNormFusion::ResidualDropout(d) => (d.params(dropout_training)?, 0),
        };
        if config.has_weight() {
            base_flags |= FLAG_WEIGHT;
        }
        if config.has_bias() {
            base_flags |= FLAG_BIAS;
        }
        // One uniform per (accumulate dx, accumulate params, dh_in) combination.
        let uniforms = (0..8usize)
            .map(|variant| {
                let mut flags = base_flags;
                for (bit, flag) in [(1, FLAG_ACCUM_DX), (2, FLAG_ACCUM_PARAMS), (4, FLAG_DH_IN)] {
                    if variant & bit != 0 {
                        flags |= flag;
                    }
                }
                let params = LnBackwardParams {
                    rows: rows as u32,
                    width: width as u32,
                    flags,
                    row_blocks: row_blocks as u32,
                    drop_threshold: d.threshold,
                    drop_flags: d.flags,
                    drop_scale: d.scale,
                    col_tiles: col_tiles as u32,
                    lanes,
                    _pad0: 0,
                    _pad1: 0,
                    _pad2: 0,
                };
                uniform_buffer(device, "layer_norm backward params", &params)
            })
            .collect();
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
            limits,
            uniforms,
            row_centre: scratch("layer_norm backward row centres", rows * 8),
            partials: scratch("layer_norm backward partials", partial_bytes),
            dx_groups: fold_workgroups(OP, rows.div_ceil(u64::from(256 / lanes)), limits.max_workgroups_per_dim)?,
            partial_groups: fold_workgroups(OP, row_blocks * col_tiles, limits.max_workgroups_per_dim)?,
            final_groups: fold_workgroups(OP, col_tiles, limits.max_workgroups_per_dim)?,
        })
    }
}

/// The buffers of one LayerNorm backward (f32).
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
    limits: BindLimits,
    uniforms: Vec<wgpu::Buffer>,
    row_centre: wgpu::Buffer,
    partials: wgpu::Buffer,
    dx_groups: (u32, u32),
    partial_groups: (u32, u32),
    final_groups: (u32, u32),
}

impl LayerNormBackwardPlan {
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

    /// Checks the buffers without recording anything.
    pub fn validate(&self, b: &LayerNormBackwardBuffers<'_>) -> Result<()> {
        let l = &self.limits;
        let (x_bytes, w_bytes, r_bytes) = (self.rows * self.width * 4, self.width * 4, self.rows * 4);
        l.check(OP, "x", &b.x, x_bytes)?;
        l.check(OP, "dy", &b.dy, x_bytes)?;
        l.check(OP, "dx", &b.dx, x_bytes)?;
        l.check(OP, "rstd", &b.rstd, r_bytes)?;
        let mut inputs = vec![("x", &b.x), ("dy", &b.dy), ("rstd", &b.rstd)];
        let mut outputs = vec![("dx", &b.dx)];
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
            l.check(OP, "weight", w, w_bytes)?;
            l.check(OP, "dweight", dw, w_bytes)?;
            inputs.push(("weight", w));
            outputs.push(("dweight", dw));
        }
        if self.config.has_bias() {
            let db = b
                .dbias
                .as_ref()
                .ok_or_else(|| required("dbias", "when there is a bias"))?;
            l.check(OP, "dbias", db, w_bytes)?;
            outputs.push(("dbias", db));
        }
        if self.fusion != LayerNormFusion::None {
            let rng = b.rng.as_ref().ok_or_else(|| required("rng", "with a dropout fusion"))?;
            check_rng(l, OP, rng)?;
            inputs.push(("rng", rng));
        }
        if let LayerNormFusion::ResidualDropout(_) = self.fusion {
            let dres = b
                .dresidual
                .as_ref()
                .ok_or_else(|| required("dresidual", "for the residual block"))?;
            l.check(OP, "dresidual", dres, x_bytes)?;
            outputs.push(("dresidual", dres));
            if let Some(dh) = &b.dh_in {
                l.check(OP, "dh_in", dh, x_bytes)?;
                inputs.push(("dh_in", dh));
            }
        }
        check_distinct(OP, &inputs, &outputs)?;
        Ok(())
    }

    /// Records the backward. Checks everything first: on error nothing is recorded.
    pub fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        accumulate: Accumulate,
        b: &LayerNormBackwardBuffers<'_>,
    ) -> Result<()> {
        self.validate(b)?;
        let k = &self.kernel;
        let ph = &k.placeholders;
        let (x_bytes, w_bytes, r_bytes) = (self.rows * self.width * 4, self.width * 4, self.rows * 4);
        let residual = matches!(self.fusion, LayerNormFusion::ResidualDropout(_));
        let has_dh = residual && b.dh_in.is_some();
        let variant = usize::from(accumulate.dx) | usize::from(accumulate.params) << 1 | usize::from(has_dh) << 2;
        let uniform = self.uniforms[variant].as_entire_binding();
        let (x, dy, rstd) = (
            binding(&b.x, x_bytes),
            binding(&b.dy, x_bytes),
            binding(&b.rstd, r_bytes),
        );
        let rng = binding_or(self.fusion != LayerNormFusion::None, &b.rng, &ph[3], RNG_STATE_BYTES);
        let (centre, partials) = (self.row_centre.as_entire_binding(), self.partials.as_entire_binding());
        let mut dx_entries = vec![
            (0, uniform.clone()),
            (1, x.clone()),
            (2, dy.clone()),
            (3, binding(&b.dx, x_bytes)),
            (4, binding_or(self.config.has_weight(), &b.weight, &ph[0], w_bytes)),
            (5, rstd.clone()),
            (6, centre.clone()),
        ];
        // Both the dx and the partial pass reach the generator state (the mask is applied to
        // dy or to dh under a flag), so it is always bound: the placeholder without dropout.
        dx_entries.push((10, rng.clone()));
        let dx_pipeline = if residual {
            dx_entries.push((11, binding_or(has_dh, &b.dh_in, &ph[4], x_bytes)));
            if let Some(dres) = &b.dresidual {
                dx_entries.push((12, binding(dres, x_bytes)));
            }
            &k.residual_dx
        } else {
            &k.dx
        };
        let partial_entries = vec![
            (0, uniform.clone()),
            (1, x),
            (2, dy),
            (5, rstd),
            (6, centre),
            (7, partials.clone()),
            (10, rng),
        ];
        let passes = [
            (
                dx_pipeline,
                bind_group(device, "lnb_dx", dx_pipeline, &dx_entries),
                self.dx_groups,
            ),
            (
                &k.params_partial,
                bind_group(device, "lnb_params_partial", &k.params_partial, &partial_entries),
                self.partial_groups,
            ),
            (
                &k.params_final,
                bind_group(
                    device,
                    "lnb_params_final",
                    &k.params_final,
                    &[
                        (0, uniform),
                        (7, partials),
                        (8, binding_or(self.config.has_weight(), &b.dweight, &ph[1], w_bytes)),
                        (9, binding_or(self.config.has_bias(), &b.dbias, &ph[2], w_bytes)),
                    ],
                ),
                self.final_groups,
            ),
        ];
        // Without γ and β there is nothing to reduce; only the dx pass runs.
        let count = if self.config.has_weight() || self.config.has_bias() {
            3
        } else {
            1
        };
        record(encoder, "layer_norm backward", &passes[..count]);
        Ok(())
    }
}
