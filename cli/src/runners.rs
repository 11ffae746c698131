//! Benchmark runners shared by `normdrop bench` and the criterion benches: every op with its
//! buffers allocated once, its minimal-traffic formula, validation against the CPU reference,
//! and a timer (GPU timestamps when the adapter has `TIMESTAMP_QUERY`, else wall time around
//! submit-and-wait).
//!
//! These kernels are memory-bound: an op's floor is its minimal bytes ÷ bandwidth. `E` is the
//! element count and `s` the bytes per element (4 for f32).

use std::time::Instant;

use normdrop::kernels::{
    rng_state_bytes, BatchNormBackwardBuffers, BatchNormBackwardKernel, BatchNormBuffers, BatchNormConfig,
    BatchNormKernel, CopyGrain, CopyKernel, DropoutBuffers, DropoutConfig, DropoutKernel, DropoutUnit,
    GroupNormBackwardBuffers, GroupNormBackwardKernel, GroupNormBuffers, GroupNormConfig, GroupNormKernel,
    LayerNormBackwardBuffers, LayerNormBackwardKernel, LayerNormBuffers, LayerNormConfig, LayerNormFusion,
    LayerNormKernel, RmsNormBackwardBuffers, RmsNormBackwardKernel, RmsNormBuffers, RmsNormConfig, RmsNormKernel,
    RmsNormResidualBackwardBuffers, RmsNormResidualBuffers,
};
use normdrop::tuning::BatchNormPlanOptions;
use normdrop::{wgpu, Accumulate, Context, DType, Error, Result, Tensor};

/// Which shape family an op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `(N, C, *)` BatchNorm shapes.
    BatchNorm,
    /// `(rows, width)` LayerNorm shapes.
    LayerNorm,
    /// Flat element counts (Dropout), or `(N, C, *)` for Dropout2d.
    Dropout,
    /// `(N, C, *)` GroupNorm shapes, with [`group_count`] groups.
    GroupNorm,
}

/// The groups the GroupNorm runners use for `c` channels: gcd(C, 32) (32 for the diffusion
/// models' 320, 640, 1280 channels; 1 for an odd C).
pub fn group_count(c: usize) -> usize {
    let (mut a, mut b) = (c.max(1), 32);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// One benchmarked op.
#[derive(Clone, Copy, Debug)]
pub struct OpSpec {
    /// Name, e.g. `batch_norm_train_forward`.
    pub name: &'static str,
    /// Shape family.
    pub family: Family,
    /// Minimal traffic in units of `E·s`.
    pub passes: u64,
    /// The unfused sequence a fused op replaces (timed at the same shape for the speedup).
    pub unfused: &'static [&'static str],
}

/// Every op `normdrop bench` runs, in report order.
pub const OPS: &[OpSpec] = &[
    OpSpec {
        name: "batch_norm_train_forward",
        family: Family::BatchNorm,
        passes: 3,
        unfused: &[],
    },
    OpSpec {
        name: "batch_norm_eval_forward",
        family: Family::BatchNorm,
        passes: 2,
        unfused: &[],
    },
    OpSpec {
        name: "batch_norm_train_backward",
        family: Family::BatchNorm,
        passes: 5,
        unfused: &[],
    },
    OpSpec {
        name: "batch_norm_eval_backward",
        family: Family::BatchNorm,
        passes: 3,
        unfused: &[],
    },
    OpSpec {
        name: "batch_norm_dropout_forward",
        family: Family::BatchNorm,
        passes: 3,
        unfused: &["batch_norm_train_forward", "dropout_forward"],
    },
    OpSpec {
        name: "batch_norm_dropout_backward",
        family: Family::BatchNorm,
        passes: 5,
        unfused: &["dropout_backward", "batch_norm_train_backward"],
    },
    OpSpec {
        name: "layer_norm_forward",
        family: Family::LayerNorm,
        passes: 2,
        unfused: &[],
    },
    OpSpec {
        name: "layer_norm_backward",
        family: Family::LayerNorm,
        passes: 3,
        unfused: &[],
    },
    OpSpec {
        name: "layer_norm_dropout_forward",
        family: Family::LayerNorm,
        passes: 2,
        unfused: &["layer_norm_forward", "dropout_forward"],
    },
    OpSpec {
        name: "layer_norm_dropout_backward",
        family: Family::LayerNorm,
        passes: 3,
        unfused: &["dropout_backward", "layer_norm_backward"],
    },
    OpSpec {
        name: "residual_dropout_layer_norm_forward",
        family: Family::LayerNorm,
        passes: 4,
        unfused: &["dropout_forward", "layer_norm_forward"],
    },
    OpSpec {
        name: "residual_dropout_layer_norm_backward",
        family: Family::LayerNorm,
        passes: 4,
        unfused: &["layer_norm_backward", "dropout_backward"],
    },
    OpSpec {
        name: "rms_norm_forward",
        family: Family::LayerNorm,
        passes: 2,
        unfused: &[],
    },
    OpSpec {
        name: "rms_norm_backward",
        family: Family::LayerNorm,
        passes: 3,
        unfused: &[],
    },
    OpSpec {
        name: "residual_dropout_rms_norm_forward",
        family: Family::LayerNorm,
        passes: 4,
        unfused: &["dropout_forward", "rms_norm_forward"],
    },
    OpSpec {
        name: "residual_dropout_rms_norm_backward",
        family: Family::LayerNorm,
        passes: 4,
        unfused: &["rms_norm_backward", "dropout_backward"],
    },
    OpSpec {
        name: "group_norm_forward",
        family: Family::GroupNorm,
        passes: 3,
        unfused: &[],
    },
    OpSpec {
        name: "group_norm_backward",
        family: Family::GroupNorm,
        passes: 5,
        unfused: &[],
    },
    OpSpec {
        name: "dropout_forward",
        family: Family::Dropout,
        passes: 2,
        unfused: &[],
    },
    OpSpec {
        name: "dropout_backward",
        family: Family::Dropout,
        passes: 2,
        unfused: &[],
    },
    OpSpec {
        name: "dropout2d_forward",
        family: Family::BatchNorm,
        passes: 2,
        unfused: &[],
    },
    OpSpec {
        name: "dropout2d_backward",
        family: Family::BatchNorm,
        passes: 2,
        unfused: &[],
    },
];

/// The spec of `name`.
pub fn spec(name: &str) -> Result<&'static OpSpec> {
    OPS.iter()
        .find(|o| o.name == name)
        .ok_or_else(|| Error::invalid("bench", format!("unknown op {name:?}")))
}

/// The dropout every benchmarked dropout uses.
pub const BENCH_DROPOUT: f64 = 0.1;

type EncodeFn = Box<dyn Fn(&wgpu::Device, &mut wgpu::CommandEncoder, usize) -> Result<()>>;

/// An op ready to encode: its buffers are allocated, inputs filled, and saved state from a
/// forward prepared for backward ops. `encode(…, i)` uses input set `i % sets`.
pub struct Runner {
    encode: EncodeFn,
    sets: usize,
    /// Minimal bytes one call must move.
    pub bytes: u64,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("sets", &self.sets)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Runner {
    /// Records call number `i` into `encoder`.
    pub fn encode(&self, device: &wgpu::Device, encoder: &mut wgpu::CommandEncoder, i: usize) -> Result<()> {
        (self.encode)(device, encoder, i % self.sets)
    }
}

/// Deterministic inputs in [−1, 1) of `dtype` (f16 values are the f32 ones rounded). The
/// tensor is allocated first (so a size beyond the device's limits fails before any host
/// memory is spent) and filled in chunks of at most [`FILL_CHUNK`] elements, so that host memory
/// stays small whatever the shape.
fn fill(ctx: &Context, shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let t = Tensor::zeros(ctx, shape, dtype)?;
    let mut values = fill_iter(seed, dtype);
    let mut offset = 0u64;
    let mut left = t.numel();
    while left > 0 {
        let n = left.min(FILL_CHUNK);
        let chunk: Vec<f32> = values.by_ref().take(n).collect();
        let mut bytes = match dtype {
            DType::F32 => bytemuck::cast_slice::<f32, u8>(&chunk).to_vec(),
            DType::F16 => chunk
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        // Queue writes are whole 4-byte words: an odd count of halves ends in the padding.
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        ctx.scoped(|| ctx.queue().write_buffer(t.buffer(), offset, &bytes))?;
        offset += bytes.len() as u64;
        left -= n;
    }
    Ok(t)
}

/// Elements [`fill`] writes per queue write (an even count, so f16 chunks stay whole words).
const FILL_CHUNK: usize = 1 << 20;

/// The values [`fill`] uploads, as f32 (exact for f16).
fn fill_values(shape: &[usize], seed: u64, dtype: DType) -> Vec<f32> {
    fill_iter(seed, dtype).take(shape.iter().product()).collect()
}

/// The endless sequence behind [`fill`]: xorshift64 values in [−1, 1), rounded to f16 for F16.
fn fill_iter(seed: u64, dtype: DType) -> impl Iterator<Item = f32> {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    std::iter::repeat_with(move || {
        z ^= z << 13;
        z ^= z >> 7;
        z ^= z << 17;
        let v = (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        match dtype {
            DType::F32 => v,
            DType::F16 => half::f16::from_f32(v).to_f32(),
        }
    })
}

fn zeros(ctx: &Context, shape: &[usize]) -> Result<Tensor> {
    Tensor::zeros(ctx, shape, DType::F32)
}

/// How many input copies to rotate through so that a small tensor is not served from cache:
/// enough to cover 256 MiB, at most 4.
pub fn rotation_sets(bytes: u64) -> usize {
    (256u64 << 20).div_ceil(bytes.max(1)).clamp(1, 4) as usize
}

/// Builds the f32 runner of `name` at `shape`, rotating through `sets` input copies.
pub fn build(ctx: &Context, name: &str, shape: &[usize], sets: usize) -> Result<Runner> {
    build_as(ctx, name, shape, sets, DType::F32)
}

/// Builds the runner of `name` at `shape` with activations of `dtype` (f16 runs the storage
/// path [`Context::storage`] picks). Minimal bytes count the activations at their own size.
pub fn build_as(ctx: &Context, name: &str, shape: &[usize], sets: usize, dtype: DType) -> Result<Runner> {
    let spec = spec(name)?;
    let numel: u64 = shape.iter().map(|&d| d as u64).product();
    let bytes = spec.passes * numel * dtype.size() as u64;
    let sets = sets.max(1);
    let xs: Vec<Tensor> = (0..sets)
        .map(|i| fill(ctx, shape, i as u64 + 1, dtype))
        .collect::<Result<_>>()?;
    let dy = fill(ctx, shape, 99, dtype)?;
    let act = |shape: &[usize]| Tensor::zeros(ctx, shape, dtype);
    let y = act(shape)?;
    let rng = zeros(ctx, &[4])?;
    ctx.queue().write_buffer(rng.buffer(), 0, &rng_state_bytes(1234, 0));
    let dropout = DropoutConfig::new(BENCH_DROPOUT);
    let device = ctx.device();
    let encode: EncodeFn = match spec.family {
        Family::BatchNorm if name.starts_with("batch_norm") => {
            let c = *shape
                .get(1)
                .ok_or_else(|| Error::shape("bench", "shape", shape, "(N, C, *)"))?;
            let config = BatchNormConfig::new(c);
            let fused = name.starts_with("batch_norm_dropout");
            let training = !name.starts_with("batch_norm_eval");
            let options = BatchNormPlanOptions {
                dropout: fused.then_some(dropout),
                ..Default::default()
            };
            let plan = ctx
                .kernel_for::<BatchNormKernel>(dtype)?
                .plan_with(device, shape, &config, &options)?;
            let per_c = || -> Result<Vec<Tensor>> { (0..6).map(|_| zeros(ctx, &[c])).collect() };
            let p = per_c()?; // weight, bias, running_mean, running_var, save_mean, save_invstd
            ctx.queue()
                .write_buffer(p[0].buffer(), 0, bytemuck::cast_slice(&vec![1.0f32; c]));
            ctx.queue()
                .write_buffer(p[3].buffer(), 0, bytemuck::cast_slice(&vec![1.0f32; c]));
            let nbt = zeros(ctx, &[2])?;
            let (dx, dw, db) = (act(shape)?, zeros(ctx, &[c])?, zeros(ctx, &[c])?);
            if name.ends_with("_forward") {
                Box::new(move |device, encoder, i| {
                    let args = bn_args(&xs[i], &y, &p, &nbt, fused.then_some(&rng));
                    plan.encode(device, encoder, training, &args)
                })
            } else {
                // Backward ops time the backward only; one forward prepares the saved stats.
                let mut encoder = device.create_command_encoder(&Default::default());
                plan.encode(
                    device,
                    &mut encoder,
                    training,
                    &bn_args(&xs[0], &y, &p, &nbt, fused.then_some(&rng)),
                )?;
                ctx.queue().submit([encoder.finish()]);
                let bplan = ctx.kernel_for::<BatchNormBackwardKernel>(dtype)?.plan(
                    device,
                    shape,
                    &config,
                    fused.then_some((dropout, true)),
                )?;
                let x0 = xs[0].clone();
                Box::new(move |device, encoder, _| {
                    let args = BatchNormBackwardBuffers {
                        x: x0.buffer().slice(..),
                        dy: dy.buffer().slice(..),
                        dx: dx.buffer().slice(..),
                        weight: Some(p[0].buffer().slice(..)),
                        save_mean: p[4].buffer().slice(..),
                        save_invstd: p[5].buffer().slice(..),
                        dweight: Some(dw.buffer().slice(..)),
                        dbias: Some(db.buffer().slice(..)),
                        rng: fused.then(|| rng.buffer().slice(..)),
                    };
                    bplan.encode(device, encoder, training, Accumulate::default(), &args)
                })
            }
        }
        Family::GroupNorm => {
            let c = *shape
                .get(1)
                .ok_or_else(|| Error::shape("bench", "shape", shape, "(N, C, *)"))?;
            let config = GroupNormConfig::new(group_count(c), c);
            let plan = ctx.kernel_for::<GroupNormKernel>(dtype)?.plan(device, shape, &config)?;
            let (w, b) = (zeros(ctx, &[c])?, zeros(ctx, &[c])?);
            ctx.queue()
                .write_buffer(w.buffer(), 0, bytemuck::cast_slice(&vec![1.0f32; c]));
            let groups = [shape[0], config.num_groups];
            let (mean, rstd) = (zeros(ctx, &groups)?, zeros(ctx, &groups)?);
            let (wf, bf, mf, rf) = (w.clone(), b.clone(), mean.clone(), rstd.clone());
            let forward = move |device: &wgpu::Device, encoder: &mut wgpu::CommandEncoder, x: &Tensor| {
                plan.encode(
                    device,
                    encoder,
                    &GroupNormBuffers {
                        x: x.buffer().slice(..),
                        y: y.buffer().slice(..),
                        weight: Some(wf.buffer().slice(..)),
                        bias: Some(bf.buffer().slice(..)),
                        mean: mf.buffer().slice(..),
                        rstd: rf.buffer().slice(..),
                    },
                )
            };
            if name.ends_with("_forward") {
                Box::new(move |device, encoder, i| forward(device, encoder, &xs[i]))
            } else {
                // The backward reads the statistics that one forward saved.
                let mut encoder = device.create_command_encoder(&Default::default());
                forward(device, &mut encoder, &xs[0])?;
                ctx.queue().submit([encoder.finish()]);
                let bplan = ctx
                    .kernel_for::<GroupNormBackwardKernel>(dtype)?
                    .plan(device, shape, &config)?;
                let (dx, dw, db) = (act(shape)?, zeros(ctx, &[c])?, zeros(ctx, &[c])?);
                let x0 = xs[0].clone();
                Box::new(move |device, encoder, _| {
                    let args = GroupNormBackwardBuffers {
                        x: x0.buffer().slice(..),
                        dy: dy.buffer().slice(..),
                        dx: dx.buffer().slice(..),
                        weight: Some(w.buffer().slice(..)),
                        mean: mean.buffer().slice(..),
                        rstd: rstd.buffer().slice(..),
                        dweight: Some(dw.buffer().slice(..)),
                        dbias: Some(db.buffer().slice(..)),
                    };
                    bplan.encode(device, encoder, &args, Accumulate::default())
                })
            }
        }
        Family::LayerNorm if name.starts_with("residual_dropout_rms_norm") => {
            let width = *shape
                .last()
                .ok_or_else(|| Error::shape("bench", "shape", shape, "(rows, width)"))?;
            let rows = (numel / width as u64) as usize;
            let config = RmsNormConfig::new(&[width]);
            let options = normdrop::tuning::LayerNormPlanOptions::default();
            let plan = ctx
                .kernel_for::<RmsNormKernel>(dtype)?
                .plan_residual(device, shape, &config, dropout, &options)?;
            let w = zeros(ctx, &[width])?;
            ctx.queue()
                .write_buffer(w.buffer(), 0, bytemuck::cast_slice(&vec![1.0f32; width]));
            let (rstd, res, h) = (zeros(ctx, &[rows])?, fill(ctx, shape, 7, dtype)?, act(shape)?);
            let (wf, rf, hf, rngf) = (w.clone(), rstd.clone(), h.clone(), rng.clone());
            let forward = move |device: &wgpu::Device, encoder: &mut wgpu::CommandEncoder, x: &Tensor| {
                plan.encode_residual(
                    device,
                    encoder,
                    true,
                    &RmsNormResidualBuffers {
                        x: x.buffer().slice(..),
                        residual: res.buffer().slice(..),
                        h: hf.buffer().slice(..),
                        y: y.buffer().slice(..),
                        weight: Some(wf.buffer().slice(..)),
                        rstd: rf.buffer().slice(..),
                        rng: rngf.buffer().slice(..),
                    },
                )
            };
            if name.ends_with("_forward") {
                Box::new(move |device, encoder, i| forward(device, encoder, &xs[i]))
            } else {
                let mut encoder = device.create_command_encoder(&Default::default());
                forward(device, &mut encoder, &xs[0])?;
                ctx.queue().submit([encoder.finish()]);
                let bplan = ctx
                    .kernel_for::<RmsNormBackwardKernel>(dtype)?
                    .plan_residual(device, shape, &config, dropout, true, &options)?;
                let (dx, dw, dres) = (act(shape)?, zeros(ctx, &[width])?, act(shape)?);
                Box::new(move |device, encoder, _| {
                    let args = RmsNormResidualBackwardBuffers {
                        h: h.buffer().slice(..),
                        dy: dy.buffer().slice(..),
                        dx: dx.buffer().slice(..),
                        dresidual: dres.buffer().slice(..),
                        dh_in: None,
                        weight: Some(w.buffer().slice(..)),
                        rstd: rstd.buffer().slice(..),
                        dweight: Some(dw.buffer().slice(..)),
                        rng: rng.buffer().slice(..),
                    };
                    bplan.encode_residual(device, encoder, Accumulate::default(), &args)
                })
            }
        }
        Family::LayerNorm if name.starts_with("rms_norm") => {
            let width = *shape
                .last()
                .ok_or_else(|| Error::shape("bench", "shape", shape, "(rows, width)"))?;
            let rows = (numel / width as u64) as usize;
            let config = RmsNormConfig::new(&[width]);
            let plan = ctx.kernel_for::<RmsNormKernel>(dtype)?.plan(device, shape, &config)?;
            let w = zeros(ctx, &[width])?;
            ctx.queue()
                .write_buffer(w.buffer(), 0, bytemuck::cast_slice(&vec![1.0f32; width]));
            let rstd = zeros(ctx, &[rows])?;
            let (wf, rf) = (w.clone(), rstd.clone());
            let forward = move |device: &wgpu::Device, encoder: &mut wgpu::CommandEncoder, x: &Tensor| {
                plan.encode(
                    device,
                    encoder,
                    &RmsNormBuffers {
                        x: x.buffer().slice(..),
                        y: y.buffer().slice(..),
                        weight: Some(wf.buffer().slice(..)),
                        rstd: rf.buffer().slice(..),
                    },
                )
            };
            if name.ends_with("_forward") {
                Box::new(move |device, encoder, i| forward(device, encoder, &xs[i]))
            } else {
                let mut encoder = device.create_command_encoder(&Default::default());
                forward(device, &mut encoder, &xs[0])?;
                ctx.queue().submit([encoder.finish()]);
                let bplan = ctx
                    .kernel_for::<RmsNormBackwardKernel>(dtype)?
                    .plan(device, shape, &config)?;
                // The backward reads the rstd that forward wrote.
                let (dx, dw) = (act(shape)?, zeros(ctx, &[width])?);
                let x0 = xs[0].clone();
                Box::new(move |device, encoder, _| {
                    let args = RmsNormBackwardBuffers {
                        x: x0.buffer().slice(..),
                        dy: dy.buffer().slice(..),
                        dx: dx.buffer().slice(..),
                        weight: Some(w.buffer().slice(..)),
                        rstd: rstd.buffer().slice(..),
                        dweight: Some(dw.buffer().slice(..)),
                    };
                    bplan.encode(device, encoder, Accumulate::default(), &args)
                })
            }
        }
        Family::LayerNorm => {
            let width = *shape
                .last()
                .ok_or_else(|| Error::shape("bench", "shape", shape, "(rows, width)"))?;
            let rows = (numel / width as u64) as usize;
            let config = LayerNormConfig::new(&[width]);
            let fusion = match name {
                n if n.starts_with("layer_norm_dropout") => LayerNormFusion::Dropout(dropout),
                n if n.starts_with("residual") => LayerNormFusion::ResidualDropout(dropout),
                _ => LayerNormFusion::None,
            };
            let residual = matches!(fusion, LayerNormFusion::ResidualDropout(_));
            let plan = ctx
                .kernel_for::<LayerNormKernel>(dtype)?
                .plan(device, shape, &config, fusion)?;
            let (w, b) = (zeros(ctx, &[width])?, zeros(ctx, &[width])?);
            ctx.queue()
                .write_buffer(w.buffer(), 0, bytemuck::cast_slice(&vec![1.0f32; width]));
            let (mean, rstd) = (zeros(ctx, &[rows])?, zeros(ctx, &[rows])?);
            let (res, h) = (fill(ctx, shape, 7, dtype)?, act(shape)?);
            let dropping = fusion != LayerNormFusion::None;
            let ln = LnSet {
                y,
                w,
                b,
                mean,
                rstd,
                rng,
                res,
                h,
            };
            if name.ends_with("_forward") {
                Box::new(move |device, encoder, i| {
                    plan.encode(device, encoder, true, &ln.args(&xs[i], dropping, residual))
                })
            } else {
                let mut encoder = device.create_command_encoder(&Default::default());
                plan.encode(device, &mut encoder, true, &ln.args(&xs[0], dropping, residual))?;
                ctx.queue().submit([encoder.finish()]);
                let bplan = ctx
                    .kernel_for::<LayerNormBackwardKernel>(dtype)?
                    .plan(device, shape, &config, fusion, true)?;
                let (dx, dw, db, dres) = (act(shape)?, zeros(ctx, &[width])?, zeros(ctx, &[width])?, act(shape)?);
                // The residual block's backward reads the h its forward wrote.
                let input = if residual { ln.h.clone() } else { xs[0].clone() };
                Box::new(move |device, encoder, _| {
                    let args = LayerNormBackwardBuffers {
                        x: input.buffer().slice(..),
                        dy: dy.buffer().slice(..),
                        dx: dx.buffer().slice(..),
                        weight: Some(ln.w.buffer().slice(..)),
                        rstd: ln.rstd.buffer().slice(..),
                        dweight: Some(dw.buffer().slice(..)),
                        dbias: Some(db.buffer().slice(..)),
                        rng: dropping.then(|| ln.rng.buffer().slice(..)),
                        dh_in: None,
                        dresidual: residual.then(|| dres.buffer().slice(..)),
                    };
                    bplan.encode(device, encoder, Accumulate::default(), &args)
                })
            }
        }
        Family::Dropout | Family::BatchNorm => {
            let unit = if name.starts_with("dropout2d") {
                DropoutUnit::Channel
            } else {
                DropoutUnit::Element
            };
            let plan = ctx
                .kernel_for::<DropoutKernel>(dtype)?
                .plan(device, shape, &dropout, unit)?;
            let backward = name.ends_with("_backward");
            Box::new(move |device, encoder, i| {
                let args = DropoutBuffers {
                    x: if backward {
                        dy.buffer().slice(..)
                    } else {
                        xs[i].buffer().slice(..)
                    },
                    y: y.buffer().slice(..),
                    rng: rng.buffer().slice(..),
                };
                if backward {
                    plan.encode_backward(device, encoder, true, false, &args)
                } else {
                    plan.encode(device, encoder, true, &args)
                }
            })
        }
    };
    Ok(Runner { encode, sets, bytes })
}

/// The forward arguments of a BatchNorm runner: `p` = [γ, β, running mean, running var,
/// saved mean, saved invstd].
fn bn_args<'a>(
    x: &'a Tensor,
    y: &'a Tensor,
    p: &'a [Tensor],
    nbt: &'a Tensor,
    rng: Option<&'a Tensor>,
) -> BatchNormBuffers<'a> {
    BatchNormBuffers {
        x: x.buffer().slice(..),
        y: y.buffer().slice(..),
        weight: Some(p[0].buffer().slice(..)),
        bias: Some(p[1].buffer().slice(..)),
        running_mean: Some(p[2].buffer().slice(..)),
        running_var: Some(p[3].buffer().slice(..)),
        num_batches_tracked: Some(nbt.buffer().slice(..)),
        save_mean: p[4].buffer().slice(..),
        save_invstd: p[5].buffer().slice(..),
        rng: rng.map(|r| r.buffer().slice(..)),
    }
}

/// The buffers of a LayerNorm runner besides its inputs.
struct LnSet {
    y: Tensor,
    w: Tensor,
    b: Tensor,
    mean: Tensor,
    rstd: Tensor,
    rng: Tensor,
    res: Tensor,
    h: Tensor,
}

impl LnSet {
    fn args<'a>(&'a self, x: &'a Tensor, dropping: bool, residual: bool) -> LayerNormBuffers<'a> {
        LayerNormBuffers {
            x: x.buffer().slice(..),
            y: self.y.buffer().slice(..),
            weight: Some(self.w.buffer().slice(..)),
            bias: Some(self.b.buffer().slice(..)),
            mean: self.mean.buffer().slice(..),
            rstd: self.rstd.buffer().slice(..),
            rng: dropping.then(|| self.rng.buffer().slice(..)),
            residual: residual.then(|| self.res.buffer().slice(..)),
            h: residual.then(|| self.h.buffer().slice(..)),
        }
    }
}

/// A runner of the vec4 copy kernel over `bytes` (rounded to a multiple of 16), `grain` quads
/// per invocation.
pub fn copy_runner(ctx: &Context, bytes: u64, sets: usize, grain: CopyGrain) -> Result<Runner> {
    let n = (bytes / 16).max(1) as usize * 4;
    let plan = ctx.kernel::<CopyKernel>()?.plan_with(ctx.device(), n, grain)?;
    let srcs: Vec<Tensor> = (0..sets.max(1))
        .map(|i| fill(ctx, &[n], i as u64 + 5, DType::F32))
        .collect::<Result<_>>()?;
    let dst = zeros(ctx, &[n])?;
    let total = plan.bytes() * 2;
    Ok(Runner {
        encode: Box::new(move |device, encoder, i| {
            plan.encode(device, encoder, &srcs[i].buffer().slice(..), &dst.buffer().slice(..))
        }),
        sets: sets.max(1),
        bytes: total,
    })
}

/// How [`time`] measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// GPU timestamps around the op's passes.
    Timestamps,
    /// Host wall time around submit-and-wait.
    Wall,
}

impl std::fmt::Display for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Clock::Timestamps => "GPU timestamps",
            Clock::Wall => "wall time around submit-and-wait",
        })
    }
}

/// The clock [`time`] uses on this context.
pub fn clock(ctx: &Context) -> Clock {
    if ctx.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
        Clock::Timestamps
    } else {
        Clock::Wall
    }
}

/// Takes timed samples of runners on one context, with the clock of [`clock`].
pub struct Timer<'c> {
    ctx: &'c Context,
    /// With `TIMESTAMP_QUERY`: two queries, their resolve buffer, and ns per tick.
    stamps: Option<(wgpu::QuerySet, wgpu::Buffer, f64)>,
}

impl<'c> Timer<'c> {
    /// A timer on `ctx`.
    pub fn new(ctx: &'c Context) -> Result<Self> {
        let stamps = match clock(ctx) {
            Clock::Wall => None,
            Clock::Timestamps => {
                let queries = ctx.scoped(|| {
                    ctx.device().create_query_set(&wgpu::QuerySetDescriptor {
                        label: Some("bench timestamps"),
                        ty: wgpu::QueryType::Timestamp,
                        count: 2,
                    })
                })?;
                let resolve = ctx.create_buffer(
                    "bench resolve",
                    16,
                    wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                )?;
                Some((queries, resolve, f64::from(ctx.queue().get_timestamp_period())))
            }
        };
        Ok(Self { ctx, stamps })
    }

    /// Records `n` calls of `runner` from call number `*call` (which rotates its input sets).
    fn record(&self, encoder: &mut wgpu::CommandEncoder, runner: &Runner, n: usize, call: &mut usize) -> Result<()> {
        for _ in 0..n {
            runner.encode(self.ctx.device(), encoder, *call)?;
            *call += 1;
        }
        Ok(())
    }

    /// `calls` untimed calls of `runner`, waited for.
    pub fn warm_up(&self, runner: &Runner, calls: usize, call: &mut usize) -> Result<()> {
        let mut encoder = self.ctx.device().create_command_encoder(&Default::default());
        self.record(&mut encoder, runner, calls, call)?;
        self.ctx.scoped(|| self.ctx.queue().submit([encoder.finish()]))?;
        self.ctx.synchronize()
    }

    /// One sample: `per_sample` calls of `runner` recorded into one submission. Returns seconds
    /// per call.
    pub fn sample(&self, runner: &Runner, per_sample: usize, call: &mut usize) -> Result<f64> {
        let (ctx, per_sample) = (self.ctx, per_sample.max(1));
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let Some((queries, resolve, period)) = &self.stamps else {
            self.record(&mut encoder, runner, per_sample, call)?;
            let start = Instant::now();
            ctx.scoped(|| ctx.queue().submit([encoder.finish()]))?;
            ctx.synchronize()?;
            return Ok(start.elapsed().as_secs_f64() / per_sample as f64);
        };
        // Empty passes carry the timestamps, so the op's own passes need no changes.
        let mark = |encoder: &mut wgpu::CommandEncoder, begin: Option<u32>, end: Option<u32>| {
            encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench mark"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: queries,
                    beginning_of_pass_write_index: begin,
                    end_of_pass_write_index: end,
                }),
            });
        };
        mark(&mut encoder, Some(0), None);
        self.record(&mut encoder, runner, per_sample, call)?;
        mark(&mut encoder, None, Some(1));
        encoder.resolve_query_set(queries, 0..2, resolve, 0);
        ctx.scoped(|| ctx.queue().submit([encoder.finish()]))?;
        let bytes = pollster::block_on(ctx.read_buffer(resolve, 0, 16))?;
        let t0 = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let t1 = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        Ok(t1.saturating_sub(t0) as f64 * period * 1e-9 / per_sample as f64)
    }
}

/// Times `runner`: `warmup` untimed calls, then `samples` samples of `per_sample` calls each
/// recorded into one submission. Returns seconds per call for every sample.
pub fn time(ctx: &Context, runner: &Runner, warmup: usize, samples: usize, per_sample: usize) -> Result<Vec<f64>> {
    let timer = Timer::new(ctx)?;
    let mut call = 0;
    timer.warm_up(runner, warmup, &mut call)?;
    (0..samples)
        .map(|_| timer.sample(runner, per_sample, &mut call))
        .collect()
}

/// Times `op` and `yardstick` in alternation: `warmup` untimed calls of each, then `samples`
/// pairs, each a sample of `op` (as in [`time`]) followed at once by a sample of `yardstick`.
/// Returns seconds per call of both for every pair. On a shared machine whose speed drifts
/// within seconds, the two samples of a pair see the same moment, so the ratio of a pair is
/// steadier than the ratio of two separate runs' medians. Each sample follows an untimed call
/// of its own runner, so it finds the caches as a sample of [`time`] does (after its own
/// previous call) and not as the other runner left them: without that, a copy sampled right
/// after a BatchNorm op ran up to 20% faster than one after a LayerNorm op.
pub fn time_paired(
    ctx: &Context,
    op: &Runner,
    yardstick: &Runner,
    warmup: usize,
    samples: usize,
    per_sample: usize,
) -> Result<Vec<(f64, f64)>> {
    let timer = Timer::new(ctx)?;
    let (mut op_call, mut yard_call) = (0, 0);
    timer.warm_up(op, warmup, &mut op_call)?;
    timer.warm_up(yardstick, warmup, &mut yard_call)?;
    (0..samples)
        .map(|_| {
            timer.warm_up(op, 1, &mut op_call)?;
            let t = timer.sample(op, per_sample, &mut op_call)?;
            timer.warm_up(yardstick, 1, &mut yard_call)?;
            Ok((t, timer.sample(yardstick, per_sample, &mut yard_call)?))
        })
        .collect()
}

/// Median, 20th and 80th percentile of `samples`.
pub fn percentiles(samples: &[f64]) -> (f64, f64, f64) {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.2), at(0.8))
}

/// A smaller copy of a benchmark shape for validation on `ctx`: BatchNorm and Dropout2d keep C
/// (up to 64) and shrink N and the spatial dims; LayerNorm keeps the row width (so the same
/// vector path is validated) and the fewest rows, from 8, for which [`normdrop::tuning::default_lanes`]
/// picks the full shape's geometry on this adapter (on a CPU adapter that is the row-block path
/// over several blocks); flat dropout keeps up to 100003 elements.
pub fn validation_shape(ctx: &Context, family: Family, shape: &[usize]) -> Vec<usize> {
    match family {
        Family::BatchNorm => {
            let mut s: Vec<usize> = shape.iter().map(|&d| d.min(7)).collect();
            if s.len() > 1 {
                s[0] = shape[0].min(4);
                s[1] = shape[1].min(64);
            }
            s
        }
        Family::LayerNorm => {
            let width = *shape.last().unwrap_or(&1);
            let rows = shape.iter().product::<usize>() / width.max(1);
            let kind = ctx.device().adapter_info().device_type;
            let threads = normdrop::tuning::host_threads();
            let lanes = |r: usize| normdrop::tuning::default_lanes(kind, r as u64, width as u64, threads);
            let mut small = rows.min(8);
            while small < rows && lanes(small) != lanes(rows) {
                small = (2 * small).min(rows);
            }
            vec![small, width]
        }
        Family::Dropout => vec![shape.iter().product::<usize>().min(100_003)],
        // C kept whole (so the groups are the full shape's), N and the spatial dims shrunk.
        Family::GroupNorm => {
            let mut s: Vec<usize> = shape.iter().map(|&d| d.min(7)).collect();
            if s.len() > 1 {
                s[0] = shape[0].min(4);
                s[1] = shape[1];
            }
            s
        }
    }
}

/// Runs `name` at `shape` through the modules in f32 and compares every output and gradient
/// with the CPU reference (rule of `tests/fixtures/FORMAT.md`, rtol = atol = 1e-4). Returns the
/// worst comparison.
pub fn validate(ctx: &Context, name: &str, shape: &[usize]) -> Result<crate::fixture::Comparison> {
    validate_as(ctx, name, shape, DType::F32)
}

/// [`validate`] with activations of `dtype`: f16 inputs are rounded to f16 first, the
/// reference is computed from those values, and the tolerance is the float16 fixtures'
/// (rtol = atol = 4e-3).
pub fn validate_as(ctx: &Context, name: &str, shape: &[usize], dtype: DType) -> Result<crate::fixture::Comparison> {
    validate_with(ctx, name, shape, dtype, &Variation::default())
}

/// How [`validate_with`] departs from the default call.
#[derive(Clone, Copy, Debug, Default)]
pub struct Variation {
    /// Added to every input value (off-centre data: `1000` gives `1000 + U[−1, 1)`).
    pub offset: f32,
    /// BatchNorm's reduce split (`None`: the device's default).
    pub split: Option<normdrop::tuning::ReduceSplit>,
    /// LayerNorm's geometry (lanes per row, row-per-subgroup passes; default: the device's).
    pub layer_norm: normdrop::tuning::LayerNormPlanOptions,
}

/// [`validate_as`] with inputs off centre and a forced BatchNorm reduce split.
pub fn validate_with(
    ctx: &Context,
    name: &str,
    shape: &[usize],
    dtype: DType,
    variation: &Variation,
) -> Result<crate::fixture::Comparison> {
    use crate::fixture::compare;
    use normdrop::nn::{
        BatchNorm, BatchNormDropout, Dropout, Dropout2d, LayerNorm, LayerNormDropout, ResidualDropoutLayerNorm, RmsNorm,
    };
    use normdrop::reference as r;

    let spec = spec(name)?;
    let numel: usize = shape.iter().product();
    let dy = fill_values(shape, 4, dtype);
    let (x, xt) = if variation.offset == 0.0 {
        (fill_values(shape, 3, dtype), fill(ctx, shape, 3, dtype)?)
    } else {
        let round = |v: f32| match dtype {
            DType::F32 => v,
            DType::F16 => half::f16::from_f32(v).to_f32(),
        };
        let x: Vec<f32> = fill_values(shape, 3, dtype)
            .into_iter()
            .map(|v| round(v + variation.offset))
            .collect();
        let xt = Tensor::from_f32(ctx, &x, shape, dtype)?;
        (x, xt)
    };
    let dyt = fill(ctx, shape, 4, dtype)?;
    let read = |t: &Tensor| t.to_f64_blocking(ctx);
    let tol = match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
    };
    let dropout = DropoutConfig::new(BENCH_DROPOUT);
    let seed = 1234;
    let mut checks: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
    let backward = name.ends_with("_backward");
    // The dropout mask over `shape` as f64 factors (training mode, offset 0).
    let factors = |unit: DropoutUnit| -> Result<Vec<f64>> {
        Ok(r::dropout_forward(&vec![1.0; numel], shape, &dropout, unit, seed, 0, true)?.0)
    };
    match spec.name {
        "batch_norm_train_forward"
        | "batch_norm_eval_forward"
        | "batch_norm_train_backward"
        | "batch_norm_eval_backward"
        | "batch_norm_dropout_forward"
        | "batch_norm_dropout_backward" => {
            let c = shape[1];
            let config = BatchNormConfig::new(c);
            let training = !name.starts_with("batch_norm_eval");
            let fused = name.starts_with("batch_norm_dropout");
            let mut running = r::RefRunningStats::new(c);
            let fwd = r::batch_norm_forward(&x, shape, &config, None, None, Some(&mut running), training)?;
            let m = if fused {
                factors(DropoutUnit::Element)?
            } else {
                vec![1.0; numel]
            };
            let (y, grads) = if fused {
                let mut module = BatchNormDropout::new(ctx, config.clone(), dropout, seed)?;
                module.batch_norm_mut().set_reduce_split(variation.split);
                let y = module.forward(&xt)?;
                (y, if backward { Some(module.backward(&dyt)?) } else { None })
            } else {
                let mut module = BatchNorm::with_config(ctx, config.clone())?;
                module.set_reduce_split(variation.split);
                if !training {
                    module.eval();
                }
                let y = module.forward(&xt)?;
                (y, if backward { Some(module.backward(&dyt)?) } else { None })
            };
            checks.push((read(&y)?, fwd.y.iter().zip(&m).map(|(a, b)| a * b).collect()));
            if let Some(g) = grads {
                let dym: Vec<f64> = dy.iter().zip(&m).map(|(&d, f)| f64::from(d) * f).collect();
                let rg = r::batch_norm_backward(
                    &r::widen(&x),
                    &dym,
                    shape,
                    &config,
                    None,
                    &fwd.mean,
                    &fwd.invstd,
                    training,
                )?;
                checks.push((read(&g.dx)?, rg.dx));
                checks.push((read(g.dweight.as_ref().expect("affine"))?, rg.dweight));
                checks.push((read(g.dbias.as_ref().expect("affine"))?, rg.dbias));
            }
        }
        "residual_dropout_rms_norm_forward" | "residual_dropout_rms_norm_backward" => {
            let width = *shape.last().expect("(rows, width)");
            let config = RmsNormConfig::new(&[width]);
            let gamma: Vec<f32> = fill_values(&[width], 6, DType::F32)
                .iter()
                .map(|v| 1.0 + 0.5 * v)
                .collect();
            let wf = r::widen(&gamma);
            let m = factors(DropoutUnit::Element)?;
            let residual = fill_values(shape, 5, dtype);
            let h: Vec<f64> = x
                .iter()
                .zip(&m)
                .zip(&residual)
                .map(|((&v, f), &res)| {
                    let h = res + (f64::from(v) * f) as f32;
                    f64::from(match dtype {
                        DType::F32 => h,
                        DType::F16 => half::f16::from_f32(h).to_f32(),
                    })
                })
                .collect();
            let fwd = r::rms_norm_forward(&h, shape, &config, Some(&wf))?;
            let mut module = normdrop::ResidualDropoutRmsNorm::new(ctx, config.clone(), dropout, seed)?;
            module.rms_norm_mut().set_plan_options(variation.layer_norm);
            module.rms_norm_mut().set_weight(&gamma)?;
            let (y, ht) = module.forward(&xt, &fill(ctx, shape, 5, dtype)?)?;
            checks.push((read(&y)?, fwd.y.clone()));
            checks.push((read(&ht)?, h.clone()));
            if backward {
                let g = module.backward(&dyt, None)?;
                let rg = r::rms_norm_backward(&h, &r::widen(&dy), shape, &config, Some(&wf), &fwd.rstd)?;
                checks.push((read(&g.dresidual)?, rg.dx.clone()));
                checks.push((read(&g.dx)?, rg.dx.iter().zip(&m).map(|(a, b)| a * b).collect()));
                checks.push((read(g.dweight.as_ref().expect("affine"))?, rg.dweight));
            }
        }
        "group_norm_forward" | "group_norm_backward" => {
            let c = shape[1];
            let config = GroupNormConfig::new(group_count(c), c);
            let gamma: Vec<f32> = fill_values(&[c], 6, DType::F32).iter().map(|v| 1.0 + 0.5 * v).collect();
            let beta = fill_values(&[c], 8, DType::F32);
            let (xf, wf, bf) = (r::widen(&x), r::widen(&gamma), r::widen(&beta));
            let fwd = r::group_norm_forward(&xf, shape, &config, Some(&wf), Some(&bf))?;
            let mut module = normdrop::GroupNorm::with_config(ctx, config.clone())?;
            module.set_plan_options(normdrop::GroupNormPlanOptions {
                split: variation.split,
                run: None,
            });
            module.set_weight(&gamma)?;
            module.set_bias(&beta)?;
            let y = module.forward(&xt)?;
            let saved = module.saved().expect("forward saved").clone();
            checks.push((read(&y)?, fwd.y.clone()));
            checks.push((read(&saved.mean)?, fwd.mean.clone()));
            checks.push((read(&saved.rstd)?, fwd.rstd.clone()));
            if backward {
                let g = module.backward(&dyt)?;
                let rg = r::group_norm_backward(&xf, &r::widen(&dy), shape, &config, Some(&wf), &fwd.mean, &fwd.rstd)?;
                checks.push((read(&g.dx)?, rg.dx));
                checks.push((read(g.dweight.as_ref().expect("affine"))?, rg.dweight));
                checks.push((read(g.dbias.as_ref().expect("affine"))?, rg.dbias));
            }
        }
        "rms_norm_forward" | "rms_norm_backward" => {
            let width = *shape.last().expect("(rows, width)");
            let config = RmsNormConfig::new(&[width]);
            let gamma: Vec<f32> = fill_values(&[width], 6, DType::F32)
                .iter()
                .map(|v| 1.0 + 0.5 * v)
                .collect();
            let xf = r::widen(&x);
            let wf = r::widen(&gamma);
            let fwd = r::rms_norm_forward(&xf, shape, &config, Some(&wf))?;
            let mut module = RmsNorm::with_config(ctx, config.clone())?;
            module.set_plan_options(variation.layer_norm);
            module.set_weight(&gamma)?;
            let y = module.forward(&xt)?;
            checks.push((read(&y)?, fwd.y.clone()));
            checks.push((read(&module.saved().expect("forward saved").rstd)?, fwd.rstd.clone()));
            if backward {
                let g = module.backward(&dyt)?;
                let rg = r::rms_norm_backward(&xf, &r::widen(&dy), shape, &config, Some(&wf), &fwd.rstd)?;
                checks.push((read(&g.dx)?, rg.dx));
                checks.push((read(g.dweight.as_ref().expect("affine"))?, rg.dweight));
            }
        }
        "layer_norm_forward"
        | "layer_norm_backward"
        | "layer_norm_dropout_forward"
        | "layer_norm_dropout_backward"
        | "residual_dropout_layer_norm_forward"
        | "residual_dropout_layer_norm_backward" => {
            let width = *shape.last().expect("(rows, width)");
            let config = LayerNormConfig::new(&[width]);
            let m = factors(DropoutUnit::Element)?;
            let residual = fill_values(shape, 5, dtype);
            let xf = r::widen(&x);
            let ln_input: Vec<f64> = if name.starts_with("residual") {
                // h = residual + x·m, in f32 as the kernel forms it, rounded as it stores it.
                x.iter()
                    .zip(&m)
                    .zip(&residual)
                    .map(|((&v, f), &res)| {
                        let h = res + (f64::from(v) * f) as f32;
                        f64::from(match dtype {
                            DType::F32 => h,
                            DType::F16 => half::f16::from_f32(h).to_f32(),
                        })
                    })
                    .collect()
            } else {
                xf.clone()
            };
            let fwd = r::layer_norm_forward(&ln_input, shape, &config, None, None)?;
            let post = if name.starts_with("layer_norm_dropout") {
                m.clone()
            } else {
                vec![1.0; numel]
            };
            let (y, grads, extra) = if name.starts_with("layer_norm_dropout") {
                let mut module = LayerNormDropout::new(ctx, config.clone(), dropout, seed)?;
                module.layer_norm_mut().set_plan_options(variation.layer_norm);
                let y = module.forward(&xt)?;
                (y, if backward { Some(module.backward(&dyt)?) } else { None }, None)
            } else if name.starts_with("residual") {
                let mut module = ResidualDropoutLayerNorm::new(ctx, config.clone(), dropout, seed)?;
                module.layer_norm_mut().set_plan_options(variation.layer_norm);
                let (y, _h) = module.forward(&xt, &fill(ctx, shape, 5, dtype)?)?;
                let g = if backward {
                    Some(module.backward(&dyt, None)?)
                } else {
                    None
                };
                let extra = g.as_ref().map(|g| g.dresidual.clone());
                let grads = g.map(|g| normdrop::Grads {
                    dx: g.dx,
                    dweight: g.dweight,
                    dbias: g.dbias,
                });
                (y, grads, extra)
            } else {
                let mut module = LayerNorm::with_config(ctx, config.clone())?;
                module.set_plan_options(variation.layer_norm);
                let y = module.forward(&xt)?;
                (y, if backward { Some(module.backward(&dyt)?) } else { None }, None)
            };
            checks.push((read(&y)?, fwd.y.iter().zip(&post).map(|(a, b)| a * b).collect()));
            if let Some(g) = grads {
                let dyp: Vec<f64> = dy.iter().zip(&post).map(|(&d, f)| f64::from(d) * f).collect();
                let rg = r::layer_norm_backward(&ln_input, &dyp, shape, &config, None, &fwd.mean, &fwd.rstd)?;
                if let Some(dres) = extra {
                    checks.push((read(&dres)?, rg.dx.clone()));
                    checks.push((read(&g.dx)?, rg.dx.iter().zip(&m).map(|(a, b)| a * b).collect()));
                } else {
                    checks.push((read(&g.dx)?, rg.dx));
                }
                checks.push((read(g.dweight.as_ref().expect("affine"))?, rg.dweight));
                checks.push((read(g.dbias.as_ref().expect("affine"))?, rg.dbias));
            }
        }
        _ => {
            let unit = if name.starts_with("dropout2d") {
                DropoutUnit::Channel
            } else {
                DropoutUnit::Element
            };
            let mut module = match unit {
                DropoutUnit::Element => Dropout::with_config(ctx, dropout, seed)?,
                DropoutUnit::Channel => {
                    let mut d2 = Dropout2d::with_config(ctx, dropout, seed)?;
                    // Unwrap the newtype: Dropout2d derefs to the same module type.
                    std::mem::replace(&mut *d2, Dropout::with_config(ctx, dropout, seed)?)
                }
            };
            let y = module.forward(&xt)?;
            let (ry, _) = r::dropout_forward(&x, shape, &dropout, unit, seed, 0, true)?;
            checks.push((read(&y)?, ry));
            if backward {
                let dx = module.backward(&dyt)?;
                checks.push((
                    read(&dx)?,
                    r::dropout_backward(&dy, shape, &dropout, unit, seed, 0, true)?,
                ));
            }
        }
    }
    let mut worst = crate::fixture::Comparison {
        max_abs_err: 0.0,
        worst_ratio: 0.0,
        passed: true,
    };
    for (got, exp) in &checks {
        let c = compare(got, exp, tol, tol);
        if c.worst_ratio >= worst.worst_ratio || !c.passed {
            worst = crate::fixture::Comparison {
                passed: worst.passed && c.passed,
                ..c
            };
        }
    }
    Ok(worst)
}
