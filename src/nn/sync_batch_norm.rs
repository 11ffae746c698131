//! [`SyncBatchNorm`]: PyTorch's `nn.SyncBatchNorm` over any [`StatsReducer`]: a training call
//! normalizes with the statistics of every rank's slice of the batch, and its backward
//! all-reduces the two per-channel sums, so that each rank computes its slice of the
//! single-device BatchNorm of the concatenated batch.

use std::sync::Arc;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::grad::Grads;
use crate::kernels::batch_norm::{BatchNormBuffers, BatchNormConfig, BatchNormKernel, BatchNormPlan};
use crate::kernels::batch_norm_backward::{BatchNormBackwardBuffers, BatchNormBackwardKernel, BatchNormBackwardPlan};
use crate::nn::batch_norm::BatchNorm;
use crate::sync::{key, ChannelStats, StatsReducer};
use crate::tensor::{DType, Tensor};
use crate::Accumulate;

const OP: &str = "SyncBatchNorm";

/// What a training forward saved for its backward.
#[derive(Clone, Debug)]
struct SyncSaved {
    x: Tensor,
    shape: Vec<usize>,
    /// Saved mean and invstd `(C)` (the global statistics, as the GPU normalized with them).
    mean: Tensor,
    invstd: Tensor,
    /// Per channel: the global statistics in f64.
    global: Vec<ChannelStats>,
}

/// BatchNorm whose training statistics span every rank of a [`StatsReducer`] group, with
/// PyTorch's `nn.SyncBatchNorm` semantics:
///
/// - training forward: each rank holds `(N_r, C, *)` (`N_r` may differ, and may be 0); the
///   mean and biased variance are taken over `M = Σ M_r` elements; every rank updates its running
///   statistics identically (unbiased variance `var·M/(M − 1)`, momentum or cumulative average)
///   and `num_batches_tracked` once per call; `M = 1` is an error on every rank;
/// - backward: `Σdy` and `Σdy·x̂` are all-reduced, so `dx` is this rank's slice of the
///   single-device backward of the concatenated batch; `dγ`, `dβ` are this rank's own sums (the
///   data-parallel gradient all-reduce adds them up);
/// - eval: the running statistics, locally, with no communication.
///
/// Each call of a training forward costs one small all-gather to check that every rank runs
/// the same call, and one of `C × 3` values; a backward two small ones and one of `C × 2`. A
/// rank that fails after the check still takes part, so that every rank fails the call. Every rank must
/// call `forward` and `backward` in the same order. Parameters, running statistics, modes and
/// state are the wrapped [`BatchNorm`]'s (through `Deref`).
pub struct SyncBatchNorm {
    bn: BatchNorm,
    reducer: Arc<dyn StatsReducer>,
    plan: Option<BatchNormPlan>,
    backward_plan: Option<BatchNormBackwardPlan>,
    saved: Option<SyncSaved>,
}

impl std::fmt::Debug for SyncBatchNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncBatchNorm")
            .field("bn", &self.bn)
            .field("rank", &self.reducer.rank())
            .field("ranks", &self.reducer.ranks())
            .finish_non_exhaustive()
    }
}

impl SyncBatchNorm {
    /// A module on `ctx` (this rank's device) with `config`, synchronising through `reducer`.
    pub fn new(ctx: &Context, config: BatchNormConfig, reducer: Arc<dyn StatsReducer>) -> Result<Self> {
        Ok(Self {
            bn: BatchNorm::with_config(ctx, config)?,
            reducer,
            plan: None,
            backward_plan: None,
            saved: None,
        })
    }

    /// What every rank must agree on for this call.
    fn call_key(&self, call: u64, dtype: DType) -> u64 {
        let c = self.bn.config();
        key(&[
            call,
            c.num_features as u64,
            u64::from(c.eps.to_bits()),
            c.momentum.map_or(u64::MAX, |m| u64::from(m.to_bits())),
            u64::from(c.affine),
            u64::from(c.track_running_stats),
            dtype.size() as u64,
        ])
    }

    /// Every rank's agreement on this call; a rank whose `prepared` failed returns its own
    /// error (the caller's `prepared?`), the others [`Error::Distributed`].
    fn agree<T>(&self, prepared: &Result<T>, call: u64, dtype: DType) -> Result<()> {
        let status = match prepared {
            Ok(_) => Ok(self.call_key(call, dtype)),
            Err(e) => Err(Error::State {
                op: OP,
                reason: e.to_string(),
            }),
        };
        match self.reducer.agree(status) {
            Err(_) if prepared.is_err() => Ok(()),
            other => other,
        }
    }

    /// Applies the module to this rank's `x` of shape `(N_r, C, *)` (f32 or f16; `N_r` may be
    /// 0). In training mode this waits for every rank's statistics. A call that fails on any
    /// rank fails on every rank ([`Error::Distributed`] on the others) and changes nothing.
    pub fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        if !self.bn.is_training() {
            return self.bn.forward(x);
        }
        let ctx = self.bn.context().clone();
        let c = self.bn.config().num_features;
        let prepared = self.prepare_forward(&ctx, x);
        self.agree(&prepared, 1, x.dtype())?;
        let fresh = prepared?;
        let empty = x.numel() == 0;
        let plan = fresh.as_ref().or(self.plan.as_ref()).expect("prepared");
        let device = ctx.device();
        // An empty slice still updates the running statistics: its plan runs on stand-ins. From
        // here to the all-reduce a local failure still joins it, with NaN counts, so that the
        // other ranks fail too instead of waiting for this one.
        let allocated = (|| -> Result<[Tensor; 4]> {
            let (xs, y) = if empty {
                (
                    Tensor::zeros(&ctx, &[2, c], DType::F32)?,
                    Tensor::zeros(&ctx, &[2, c], DType::F32)?,
                )
            } else {
                (x.clone(), Tensor::zeros(&ctx, x.shape(), x.dtype())?)
            };
            Ok([
                xs,
                y,
                Tensor::zeros(&ctx, &[c], DType::F32)?,
                Tensor::zeros(&ctx, &[c], DType::F32)?,
            ])
        })();
        let [xs, y, mean, invstd] = match allocated {
            Ok(t) => t,
            Err(e) => return Err(self.poison_stats(e)),
        };
        let buffers = BatchNormBuffers {
            x: xs.slice(),
            y: y.slice(),
            weight: self.bn.weight().map(Tensor::slice),
            bias: self.bn.bias().map(Tensor::slice),
            running_mean: self.bn.running_mean().map(Tensor::slice),
            running_var: self.bn.running_var().map(Tensor::slice),
            num_batches_tracked: self.bn.num_batches_buffer().map(|b| b.slice(..)),
            save_mean: mean.slice(),
            save_invstd: invstd.slice(),
            rng: None,
        };
        // 1. This rank's statistics, exported per channel as (K, mean − K, M2, count).
        let local = if empty {
            Ok(vec![(0.0, ChannelStats::default()); c])
        } else {
            self.local_stats(&ctx, plan, &buffers)
        };
        let local = match local {
            Ok(local) => local,
            Err(e) => return Err(self.poison_stats(e)),
        };
        // 2. Every rank's, merged in rank order (bit-identical on every rank).
        let stats: Vec<ChannelStats> = local.iter().map(|(_, s)| *s).collect();
        let global = self.reducer.all_reduce_stats(&stats)?;
        if global.iter().any(|g| g.count.is_nan()) {
            return Err(failed_rank());
        }
        if let Some(g) = global.iter().find(|g| g.count <= 1.0) {
            return Err(Error::shape(
                OP,
                "input",
                x.shape(),
                format!(
                    "more than 1 value per channel over all ranks in training (the group holds {})",
                    g.count
                ),
            ));
        }
        // 3. The merged statistics around this rank's K, then finalize and normalize.
        let mut merged: Vec<f32> = local
            .iter()
            .zip(&global)
            .flat_map(|((k, s), g)| {
                // An empty slice has no K of its own: the global mean serves.
                let k = if s.count == 0.0 { g.mean as f32 } else { *k };
                [k, (g.mean - f64::from(k)) as f32, g.m2 as f32, g.count as f32]
            })
            .collect();
        merged.extend(global.iter().flat_map(|g| [g.mean as f32, 0.0, 0.0, 0.0]));
        let merged = Tensor::from_slice(&ctx, &merged, &[2 * c, 4])?;
        let mut encoder = device.create_command_encoder(&Default::default());
        ctx.scoped(|| plan.encode_sync_finalize(device, &mut encoder, &buffers, &merged.slice()))??;
        ctx.submit(encoder)?;
        if fresh.is_some() {
            self.plan = fresh;
        }
        self.saved = Some(SyncSaved {
            x: x.clone(),
            shape: x.shape().to_vec(),
            mean,
            invstd,
            global,
        });
        Ok(if empty {
            Tensor::zeros(&ctx, x.shape(), x.dtype())?
        } else {
            y
        })
    }

    /// Joins the statistics all-reduce with NaN counts (every rank then fails the call) and
    /// returns this rank's error `e`.
    fn poison_stats(&self, e: Error) -> Error {
        let poison = ChannelStats {
            count: f64::NAN,
            ..ChannelStats::default()
        };
        let _ = self
            .reducer
            .all_reduce_stats(&vec![poison; self.bn.config().num_features]);
        e
    }

    /// Joins the backward's second agreement with a failure (every rank then fails the call:
    /// sums can be NaN from the data, so they cannot carry the failure) and returns `e`.
    fn fail_backward(&self, e: Error) -> Error {
        let _ = self.reducer.agree(Err(Error::State {
            op: OP,
            reason: e.to_string(),
        }));
        e
    }

    /// This rank's per-channel `(K, statistics)`: the statistics pass and its export, read back.
    fn local_stats(
        &self,
        ctx: &Context,
        plan: &BatchNormPlan,
        buffers: &BatchNormBuffers<'_>,
    ) -> Result<Vec<(f32, ChannelStats)>> {
        let c = self.bn.config().num_features;
        let device = ctx.device();
        let export = Tensor::zeros(ctx, &[c, 4], DType::F32)?;
        let mut encoder = device.create_command_encoder(&Default::default());
        ctx.scoped(|| plan.encode_sync_stats(device, &mut encoder, buffers, &export.slice()))??;
        ctx.submit(encoder)?;
        let v: Vec<f32> = export.to_vec_blocking(ctx)?;
        Ok(v.chunks(4)
            .map(|e| {
                let k = e[0];
                let stats = ChannelStats {
                    count: f64::from(e[3]),
                    mean: f64::from(k) + f64::from(e[1]),
                    m2: f64::from(e[2]),
                };
                (k, stats)
            })
            .collect())
    }

    /// Checks `x` and returns a new plan when the cached one does not fit.
    fn prepare_forward(&self, ctx: &Context, x: &Tensor) -> Result<Option<BatchNormPlan>> {
        ctx.check_owns(OP, "x", x)?;
        let c = self.bn.config().num_features;
        if x.shape().len() < 2 || x.shape()[1] != c {
            return Err(Error::shape(OP, "input", x.shape(), format!("(N, C, *) with C = {c}")));
        }
        let shape: Vec<usize> = if x.numel() == 0 { vec![2, c] } else { x.shape().to_vec() };
        let storage = ctx.storage(if x.numel() == 0 { DType::F32 } else { x.dtype() });
        if self
            .plan
            .as_ref()
            .is_some_and(|p| p.shape() == shape.as_slice() && p.storage() == storage)
        {
            return Ok(None);
        }
        let options = crate::kernels::batch_norm::BatchNormPlanOptions {
            split: self.bn.reduce_split(),
            ..Default::default()
        };
        Ok(Some(ctx.kernel_with::<BatchNormKernel>(storage)?.plan_with(
            ctx.device(),
            &shape,
            self.bn.config(),
            &options,
        )?))
    }

    /// Backward of the last forward. After a training forward: waits for every rank's sums and
    /// returns this rank's `dx` and its own `dγ`, `dβ`. After an eval forward: the local
    /// backward of [`BatchNorm::backward`].
    pub fn backward(&mut self, dy: &Tensor) -> Result<Grads> {
        if !self.bn.is_training() {
            return self.bn.backward(dy);
        }
        let ctx = self.bn.context().clone();
        let c = self.bn.config().num_features;
        let prepared = self.prepare_backward(&ctx, dy);
        self.agree(&prepared, 2, dy.dtype())?;
        let (saved, fresh) = prepared?;
        let empty = dy.numel() == 0;
        let affine = self.bn.config().affine;
        // From here to the all-reduce a local failure still joins a second agreement, so that
        // the other ranks fail too instead of waiting for this one.
        let allocated = (|| -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
            let zeros_c = || Tensor::zeros(&ctx, &[c], DType::F32);
            let (dweight, dbias) = if affine {
                (Some(zeros_c()?), Some(zeros_c()?))
            } else {
                (None, None)
            };
            Ok((Tensor::zeros(&ctx, dy.shape(), dy.dtype())?, dweight, dbias))
        })();
        let (dx, dweight, dbias) = match allocated {
            Ok(t) => t,
            Err(e) => return Err(self.fail_backward(e)),
        };
        if empty {
            // Nothing local: zero sums for the others, zero dγ, dβ here.
            self.reducer.agree(Ok(self.call_key(3, dy.dtype())))?;
            self.reducer.all_reduce_sums(&vec![[0.0; 2]; c])?;
            return Ok(Grads { dx, dweight, dbias });
        }
        let plan = fresh.as_ref().or(self.backward_plan.as_ref()).expect("prepared");
        let device = ctx.device();
        let buffers = BatchNormBackwardBuffers {
            x: saved.x.slice(),
            dy: dy.slice(),
            dx: dx.slice(),
            weight: self.bn.weight().map(Tensor::slice),
            save_mean: saved.mean.slice(),
            save_invstd: saved.invstd.slice(),
            dweight: dweight.as_ref().map(Tensor::slice),
            dbias: dbias.as_ref().map(Tensor::slice),
            rng: None,
        };
        // 1. This rank's (K, Σ(x − K), Σdy, Σdy·(x − K)), turned into Σdy and Σdy·x̂ around the
        //    global mean (in f64).
        let exported = (|| -> Result<Vec<f32>> {
            let export = Tensor::zeros(&ctx, &[c, 4], DType::F32)?;
            let mut encoder = device.create_command_encoder(&Default::default());
            ctx.scoped(|| plan.encode_sync_sums(device, &mut encoder, &buffers, &export.slice()))??;
            ctx.submit(encoder)?;
            export.to_vec_blocking(&ctx)
        })();
        let e = match exported {
            Ok(e) => e,
            Err(e) => return Err(self.fail_backward(e)),
        };
        let eps = f64::from(self.bn.config().eps);
        let centred: Vec<(f32, f64, f64)> = e
            .chunks(4)
            .zip(&saved.global)
            .map(|(e, g)| {
                let k = e[0];
                let invstd = 1.0 / (g.m2 / g.count + eps).sqrt();
                let mk = g.mean - f64::from(k);
                (k, mk, invstd)
            })
            .collect();
        let local: Vec<[f64; 2]> = e
            .chunks(4)
            .zip(&centred)
            .map(|(e, (_, mk, invstd))| {
                let (sum_dy, sum_dy_xk) = (f64::from(e[2]), f64::from(e[3]));
                [sum_dy, invstd * (sum_dy_xk - mk * sum_dy)]
            })
            .collect();
        // 2. Every rank's sums, once every rank has them.
        self.reducer.agree(Ok(self.call_key(3, dy.dtype())))?;
        let global = self.reducer.all_reduce_sums(&local)?;
        // 3. dγ, dβ from this rank's sums; dx from the global ones.
        let mut import = Vec::with_capacity(8 * c);
        for ((k, mk, _), g) in centred.iter().zip(&global) {
            import.extend([*k, *mk as f32, g[0] as f32, g[1] as f32]);
        }
        for (l, g) in local.iter().zip(&saved.global) {
            import.extend([l[0] as f32, l[1] as f32, g.count as f32, 0.0]);
        }
        let import = Tensor::from_slice(&ctx, &import, &[2 * c, 4])?;
        let mut encoder = device.create_command_encoder(&Default::default());
        ctx.scoped(|| plan.encode_sync_dx(device, &mut encoder, &buffers, &import.slice(), Accumulate::default()))??;
        ctx.submit(encoder)?;
        if fresh.is_some() {
            self.backward_plan = fresh;
        }
        Ok(Grads { dx, dweight, dbias })
    }

    fn prepare_backward(&self, ctx: &Context, dy: &Tensor) -> Result<(SyncSaved, Option<BatchNormBackwardPlan>)> {
        let saved = self.saved.clone().ok_or_else(|| Error::State {
            op: OP,
            reason: "backward before any training forward".into(),
        })?;
        ctx.check_owns(OP, "dy", dy)?;
        if dy.shape() != saved.shape.as_slice() || dy.dtype() != saved.x.dtype() {
            return Err(Error::shape(
                OP,
                "dy",
                dy.shape(),
                format!("the forward's shape {:?} and dtype {}", saved.shape, saved.x.dtype()),
            ));
        }
        if dy.numel() == 0 {
            return Ok((saved, None));
        }
        let storage = ctx.storage(dy.dtype());
        if self
            .backward_plan
            .as_ref()
            .is_some_and(|p| p.shape() == saved.shape.as_slice() && p.storage() == storage)
        {
            return Ok((saved, None));
        }
        let plan = ctx.kernel_with::<BatchNormBackwardKernel>(storage)?.plan_with(
            ctx.device(),
            &saved.shape,
            self.bn.config(),
            None,
            self.bn.reduce_split(),
        )?;
        Ok((saved, Some(plan)))
    }
}

/// What every rank reports when another rank failed between the agreement and the all-reduce
/// (it sent NaN counts or sums).
fn failed_rank() -> Error {
    Error::Distributed {
        op: OP,
        reason: "another rank failed this call after the ranks agreed on it".into(),
    }
}

impl std::ops::Deref for SyncBatchNorm {
    type Target = BatchNorm;
    fn deref(&self) -> &BatchNorm {
        &self.bn
    }
}

impl std::ops::DerefMut for SyncBatchNorm {
    fn deref_mut(&mut self) -> &mut BatchNorm {
        &mut self.bn
    }
}
