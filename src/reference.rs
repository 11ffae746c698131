//! CPU references for every op, written to be obviously right rather than fast: plain loops,
//! f64 accumulation, two-pass variance. Tests and `normdrop check`/`bench` compare the GPU
//! kernels against these.

use crate::error::{Error, Result};
use crate::kernels::batch_norm::BatchNormConfig;
use crate::kernels::dropout::{DropoutConfig, DropoutUnit};
use crate::kernels::layer_norm::LayerNormConfig;
use crate::kernels::norm_configs::{GroupNormConfig, RmsNormConfig};
use crate::rng;

/// Running statistics carried between reference BatchNorm steps, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct RefRunningStats {
    /// Running mean, `(C)`.
    pub mean: Vec<f64>,
    /// Running unbiased variance, `(C)`.
    pub var: Vec<f64>,
    /// Number of training steps taken.
    pub num_batches_tracked: u64,
}

impl RefRunningStats {
    /// PyTorch's initial state: mean 0, var 1, count 0.
    pub fn new(channels: usize) -> Self {
        Self {
            mean: vec![0.0; channels],
            var: vec![1.0; channels],
            num_batches_tracked: 0,
        }
    }
}

/// Output of [`batch_norm_forward`].
#[derive(Clone, Debug)]
pub struct RefBatchNorm {
    /// `y`, same shape as the input.
    pub y: Vec<f64>,
    /// The mean normalized with, `(C)`: batch mean, or running mean in eval.
    pub mean: Vec<f64>,
    /// `1/sqrt(var + eps)` normalized with, `(C)`: biased batch variance, or running variance.
    pub invstd: Vec<f64>,
}

/// BatchNorm forward with PyTorch semantics over `x` of `shape = (N, C, *)`.
///
/// `running` is updated in place when `training` and `config.track_running_stats`; it must be
/// `Some` when tracking. `weight`/`bias` default to 1/0 when `None` or when `!config.affine`.
pub fn batch_norm_forward(
    x: &[f32],
    shape: &[usize],
    config: &BatchNormConfig,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    running: Option<&mut RefRunningStats>,
    training: bool,
) -> Result<RefBatchNorm> {
    let (weight, bias) = (weight.map(widen), bias.map(widen));
    batch_norm_forward_f64(
        &widen(x),
        shape,
        config,
        weight.as_deref(),
        bias.as_deref(),
        running,
        training,
    )
}

/// f32 values widened to f64.
pub fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// [`batch_norm_forward`] with every input in f64 (finite-difference checks perturb them).
pub fn batch_norm_forward_f64(
    x: &[f64],
    shape: &[usize],
    config: &BatchNormConfig,
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
    running: Option<&mut RefRunningStats>,
    training: bool,
) -> Result<RefBatchNorm> {
    const OP: &str = "batch_norm reference";
    config.validate()?;
    if shape.len() < 2 || shape[1] != config.num_features {
        return Err(Error::shape(OP, "input", shape, "(N, num_features, *)"));
    }
    let (n, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    let m = n * s;
    if x.len() != n * c * s || m == 0 {
        return Err(Error::shape(OP, "input", shape, "a non-empty shape matching x"));
    }
    let at = |ni: usize, ci: usize, si: usize| x[(ni * c + ci) * s + si];
    let gamma = |ci: usize| {
        if config.affine {
            weight.map_or(1.0, |w| w[ci])
        } else {
            1.0
        }
    };
    let beta = |ci: usize| {
        if config.affine {
            bias.map_or(0.0, |b| b[ci])
        } else {
            0.0
        }
    };
    let use_batch = training || !config.track_running_stats;
    if use_batch && m == 1 {
        return Err(Error::shape(OP, "input", shape, "more than 1 value per channel"));
    }
    let mut running = running;
    if config.track_running_stats && running.is_none() {
        return Err(Error::invalid(OP, "running statistics are required when tracking"));
    }
    // PyTorch increments the counter before computing the cumulative factor.
    let factor = match (&mut running, training && config.track_running_stats) {
        (Some(r), true) => {
            r.num_batches_tracked += 1;
            Some(config.momentum.map_or(1.0 / r.num_batches_tracked as f64, f64::from))
        }
        _ => None,
    };

    let mut mean = vec![0.0; c];
    let mut invstd = vec![0.0; c];
    for ci in 0..c {
        if use_batch {
            // Pass 1: mean.
            let mut sum = 0.0;
            for ni in 0..n {
                for si in 0..s {
                    sum += at(ni, ci, si);
                }
            }
            let mu = sum / m as f64;
            // Pass 2: sum of squared deviations.
            let mut ssd = 0.0;
            for ni in 0..n {
                for si in 0..s {
                    let d = at(ni, ci, si) - mu;
                    ssd += d * d;
                }
            }
            mean[ci] = mu;
            invstd[ci] = 1.0 / (ssd / m as f64 + config.eps as f64).sqrt();
            // Running update with the unbiased variance.
            if let (Some(r), Some(f)) = (running.as_deref_mut(), factor) {
                r.mean[ci] = (1.0 - f) * r.mean[ci] + f * mu;
                r.var[ci] = (1.0 - f) * r.var[ci] + f * ssd / (m - 1) as f64;
            }
        } else {
            let r = running.as_deref().expect("checked above");
            mean[ci] = r.mean[ci];
            invstd[ci] = 1.0 / (r.var[ci] + config.eps as f64).sqrt();
        }
    }

    let mut y = vec![0.0; x.len()];
    for ni in 0..n {
        for ci in 0..c {
            for si in 0..s {
                let i = (ni * c + ci) * s + si;
                y[i] = (at(ni, ci, si) - mean[ci]) * invstd[ci] * gamma(ci) + beta(ci);
            }
        }
    }
    Ok(RefBatchNorm { y, mean, invstd })
}

/// Dropout / Dropout2d forward: `y = x·m`, with the mask of [`crate::rng`] under
/// `(seed, offset)` in training, and every unit kept in eval. Returns `y` and the per-unit mask.
pub fn dropout_forward(
    x: &[f32],
    shape: &[usize],
    config: &DropoutConfig,
    unit: DropoutUnit,
    seed: u64,
    offset: u64,
    training: bool,
) -> Result<(Vec<f64>, Vec<bool>)> {
    let rule = config.rule()?;
    let numel: usize = shape.iter().product();
    if x.len() != numel || numel == 0 {
        return Err(Error::shape(
            "dropout reference",
            "input",
            shape,
            "a non-empty shape matching x",
        ));
    }
    let unit_len = match unit {
        DropoutUnit::Element => 1,
        DropoutUnit::Channel => shape[2..].iter().product(),
    };
    let units = numel / unit_len;
    let mask = if training {
        rng::mask(seed, offset, units, rule)
    } else {
        vec![true; units]
    };
    let scale = f64::from(config.scale(training));
    let y = x
        .iter()
        .enumerate()
        .map(|(i, &v)| f64::from(v) * if mask[i / unit_len] { scale } else { 0.0 })
        .collect();
    Ok((y, mask))
}

/// Output of [`layer_norm_forward`].
#[derive(Clone, Debug)]
pub struct RefLayerNorm {
    /// `y`, same shape as the input.
    pub y: Vec<f64>,
    /// Row means, `(rows)`.
    pub mean: Vec<f64>,
    /// Row `1/sqrt(var + eps)`, `(rows)`.
    pub rstd: Vec<f64>,
}

/// LayerNorm forward with PyTorch semantics over the trailing `config.normalized_shape` dims.
/// `x` is given in f64 so that composed references (residual + dropout, then LayerNorm) can
/// feed an exact `h` in.
pub fn layer_norm_forward(
    x: &[f64],
    shape: &[usize],
    config: &LayerNormConfig,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
) -> Result<RefLayerNorm> {
    let (weight, bias) = (weight.map(widen), bias.map(widen));
    layer_norm_forward_f64(x, shape, config, weight.as_deref(), bias.as_deref())
}

/// [`layer_norm_forward`] with γ and β in f64.
pub fn layer_norm_forward_f64(
    x: &[f64],
    shape: &[usize],
    config: &LayerNormConfig,
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
) -> Result<RefLayerNorm> {
    config.validate()?;
    let (rows, width) = config.rows_and_width(shape)?;
    let (rows, width) = (rows as usize, width as usize);
    let gamma = |j: usize| {
        if config.has_weight() {
            weight.map_or(1.0, |w| w[j])
        } else {
            1.0
        }
    };
    let beta = |j: usize| {
        if config.has_bias() {
            bias.map_or(0.0, |b| b[j])
        } else {
            0.0
        }
    };
    let mut out = RefLayerNorm {
        y: vec![0.0; rows * width],
        mean: vec![0.0; rows],
        rstd: vec![0.0; rows],
    };
    for r in 0..rows {
        let row = &x[r * width..(r + 1) * width];
        // Pass 1: mean. Pass 2: biased variance.
        let mean = row.iter().sum::<f64>() / width as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / width as f64;
        let rstd = 1.0 / (var + f64::from(config.eps)).sqrt();
        for (j, v) in row.iter().enumerate() {
            out.y[r * width + j] = (v - mean) * rstd * gamma(j) + beta(j);
        }
        out.mean[r] = mean;
        out.rstd[r] = rstd;
    }
    Ok(out)
}

/// Output of [`rms_norm_forward`].
#[derive(Clone, Debug)]
pub struct RefRmsNorm {
    /// `y`, same shape as the input.
    pub y: Vec<f64>,
    /// Row `1/sqrt(mean(x²) + eps)`, `(rows)`.
    pub rstd: Vec<f64>,
}

/// RMSNorm forward with PyTorch semantics over the trailing `config.normalized_shape` dims:
/// `y = x·rstd·γ`, `rstd = 1/sqrt(mean(x²) + eps)`. No centering: the statistic is the mean of
/// squares itself (a sum of non-negative terms, with nothing to cancel).
pub fn rms_norm_forward(
    x: &[f64],
    shape: &[usize],
    config: &RmsNormConfig,
    weight: Option<&[f64]>,
) -> Result<RefRmsNorm> {
    config.validate()?;
    let (rows, width) = config.rows_and_width(shape)?;
    let (rows, width) = (rows as usize, width as usize);
    check_len("rms_norm reference", "x", x.len(), rows * width, shape)?;
    let gamma = |j: usize| match (config.elementwise_affine, weight) {
        (true, Some(w)) => w[j],
        _ => 1.0,
    };
    let mut out = RefRmsNorm {
        y: vec![0.0; rows * width],
        rstd: vec![0.0; rows],
    };
    for r in 0..rows {
        let row = &x[r * width..(r + 1) * width];
        let ms = row.iter().map(|v| v * v).sum::<f64>() / width as f64;
        let rstd = 1.0 / (ms + f64::from(config.eps())).sqrt();
        for (j, v) in row.iter().enumerate() {
            out.y[r * width + j] = v * rstd * gamma(j);
        }
        out.rstd[r] = rstd;
    }
    Ok(out)
}

/// RMSNorm backward given the forward's row `rstd`:
///
/// ```text
/// x̂ = x·rstd   g = dy·γ   dx = rstd·(g − x̂·mean(g·x̂))   (mean over a row)
/// dγ = Σ_rows dy·x̂
/// ```
///
/// `dbias` is empty (RMSNorm has no β); `dweight` is empty without γ.
pub fn rms_norm_backward(
    x: &[f64],
    dy: &[f64],
    shape: &[usize],
    config: &RmsNormConfig,
    weight: Option<&[f64]>,
    rstd: &[f64],
) -> Result<RefGrads> {
    let (rows, width) = config.rows_and_width(shape)?;
    let (rows, width) = (rows as usize, width as usize);
    if x.len() != rows * width || dy.len() != x.len() || rstd.len() != rows {
        return Err(Error::shape(
            "rms_norm backward reference",
            "dy",
            shape,
            "x, dy of the shape; rstd of the rows",
        ));
    }
    let gamma = |j: usize| match (config.elementwise_affine, weight) {
        (true, Some(w)) => w[j],
        _ => 1.0,
    };
    let mut out = RefGrads {
        dx: vec![0.0; x.len()],
        dweight: vec![0.0; width],
        dbias: Vec::new(),
    };
    for (r, &rs) in rstd.iter().enumerate() {
        let at = |j: usize| r * width + j;
        let xhat = |j: usize| x[at(j)] * rs;
        let mut mgx = 0.0;
        for j in 0..width {
            mgx += dy[at(j)] * gamma(j) * xhat(j);
            out.dweight[j] += dy[at(j)] * xhat(j);
        }
        mgx /= width as f64;
        for j in 0..width {
            out.dx[at(j)] = rs * (dy[at(j)] * gamma(j) - xhat(j) * mgx);
        }
    }
    if !config.elementwise_affine {
        out.dweight.clear();
    }
    Ok(out)
}

/// Output of [`group_norm_forward`].
#[derive(Clone, Debug)]
pub struct RefGroupNorm {
    /// `y`, same shape as the input.
    pub y: Vec<f64>,
    /// Group means, `(N, G)`.
    pub mean: Vec<f64>,
    /// Group `1/sqrt(var + eps)` (biased variance), `(N, G)`.
    pub rstd: Vec<f64>,
}

/// GroupNorm forward with PyTorch semantics on `(N, C, *)`: per sample and group of `C/G`
/// consecutive channels, two-pass mean and biased variance over the group's channels and
/// spatial positions; `y = (x − mean)·rstd·γ_c + β_c`.
pub fn group_norm_forward(
    x: &[f64],
    shape: &[usize],
    config: &GroupNormConfig,
    weight: Option<&[f64]>,
    bias: Option<&[f64]>,
) -> Result<RefGroupNorm> {
    let d = config.dims(shape)?;
    check_len(
        "group_norm reference",
        "x",
        x.len(),
        d.n * config.num_channels * d.spatial,
        shape,
    )?;
    let len = d.group_len();
    let mut out = RefGroupNorm {
        y: vec![0.0; x.len()],
        mean: vec![0.0; d.n * d.groups],
        rstd: vec![0.0; d.n * d.groups],
    };
    for ng in 0..d.n * d.groups {
        let group = &x[ng * len..(ng + 1) * len];
        let mean = group.iter().sum::<f64>() / len as f64;
        let var = group.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / len as f64;
        let rstd = 1.0 / (var + f64::from(config.eps)).sqrt();
        for (k, v) in group.iter().enumerate() {
            let c = (ng % d.groups) * d.channels_per_group + k / d.spatial;
            let (gamma, beta) = match (config.affine, weight, bias) {
                (true, Some(w), Some(b)) => (w[c], b[c]),
                _ => (1.0, 0.0),
            };
            out.y[ng * len + k] = (v - mean) * rstd * gamma + beta;
        }
        out.mean[ng] = mean;
        out.rstd[ng] = rstd;
    }
    Ok(out)
}

/// GroupNorm backward given the forward's `(N, G)` `mean` and `rstd`:
///
/// ```text
/// x̂ = (x − mean)·rstd   g = dy·γ_c   dx = rstd·(g − mean(g) − x̂·mean(g·x̂))   (means over a group)
/// dγ_c = Σ_{n, *} dy·x̂   dβ_c = Σ_{n, *} dy
/// ```
pub fn group_norm_backward(
    x: &[f64],
    dy: &[f64],
    shape: &[usize],
    config: &GroupNormConfig,
    weight: Option<&[f64]>,
    mean: &[f64],
    rstd: &[f64],
) -> Result<RefGrads> {
    let d = config.dims(shape)?;
    let groups = d.n * d.groups;
    if x.len() != groups * d.group_len() || dy.len() != x.len() || mean.len() != groups || rstd.len() != groups {
        return Err(Error::shape(
            "group_norm backward reference",
            "dy",
            shape,
            "x, dy of the shape; mean, rstd of (N, G)",
        ));
    }
    let len = d.group_len();
    let channel = |ng: usize, k: usize| (ng % d.groups) * d.channels_per_group + k / d.spatial;
    let gamma = |c: usize| match (config.affine, weight) {
        (true, Some(w)) => w[c],
        _ => 1.0,
    };
    let c_all = config.num_channels;
    let mut out = RefGrads {
        dx: vec![0.0; x.len()],
        dweight: vec![0.0; c_all],
        dbias: vec![0.0; c_all],
    };
    for ng in 0..groups {
        let xhat = |k: usize| (x[ng * len + k] - mean[ng]) * rstd[ng];
        let (mut mg, mut mgx) = (0.0, 0.0);
        for k in 0..len {
            let c = channel(ng, k);
            let g = dy[ng * len + k] * gamma(c);
            mg += g;
            mgx += g * xhat(k);
            out.dweight[c] += dy[ng * len + k] * xhat(k);
            out.dbias[c] += dy[ng * len + k];
        }
        mg /= len as f64;
        mgx /= len as f64;
        for k in 0..len {
            let g = dy[ng * len + k] * gamma(channel(ng, k));
            out.dx[ng * len + k] = rstd[ng] * (g - mg - xhat(k) * mgx);
        }
    }
    if !config.affine {
        out.dweight.clear();
        out.dbias.clear();
    }
    Ok(out)
}

/// `len == expected`, or a shape error naming `what` of `op`.
fn check_len(op: &'static str, what: &'static str, len: usize, expected: usize, shape: &[usize]) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            what,
            &[len],
            format!("{expected} elements for shape {shape:?}"),
        ))
    }
}

/// Gradients of one backward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct RefGrads {
    /// `dL/dx`, same shape as the input.
    pub dx: Vec<f64>,
    /// `dL/dγ` (empty without γ).
    pub dweight: Vec<f64>,
    /// `dL/dβ` (empty without β).
    pub dbias: Vec<f64>,
}

/// BatchNorm backward. `mean` and `invstd` are what the forward normalized with;
/// `batch_stats` says whether they were the batch's own (then they depend on x):
///
/// ```text
/// x̂ = (x − mean)·invstd        dγ = Σ dy·x̂        dβ = Σ dy          (sums over N and *)
/// batch stats:   dx = γ·invstd·(dy − mean(dy) − x̂·mean(dy·x̂))
/// running stats: dx = γ·invstd·dy
/// ```
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward(
    x: &[f64],
    dy: &[f64],
    shape: &[usize],
    config: &BatchNormConfig,
    weight: Option<&[f64]>,
    mean: &[f64],
    invstd: &[f64],
    batch_stats: bool,
) -> Result<RefGrads> {
    let (n, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    let m = (n * s) as f64;
    if x.len() != n * c * s || dy.len() != x.len() || mean.len() != c || invstd.len() != c {
        return Err(Error::shape(
            "batch_norm backward reference",
            "dy",
            shape,
            "x, dy of the shape; mean, invstd of (C)",
        ));
    }
    let gamma = |ci: usize| {
        if config.affine {
            weight.map_or(1.0, |w| w[ci])
        } else {
            1.0
        }
    };
    let idx = |ni: usize, ci: usize, si: usize| (ni * c + ci) * s + si;
    let mut g = RefGrads {
        dx: vec![0.0; x.len()],
        dweight: vec![0.0; c],
        dbias: vec![0.0; c],
    };
    for ci in 0..c {
        // Pass 1: the two channel sums.
        let (mut sdy, mut sdyx) = (0.0, 0.0);
        for ni in 0..n {
            for si in 0..s {
                let i = idx(ni, ci, si);
                sdy += dy[i];
                sdyx += dy[i] * (x[i] - mean[ci]) * invstd[ci];
            }
        }
        g.dweight[ci] = sdyx;
        g.dbias[ci] = sdy;
        // Pass 2: dx.
        for ni in 0..n {
            for si in 0..s {
                let i = idx(ni, ci, si);
                let xhat = (x[i] - mean[ci]) * invstd[ci];
                let centred = if batch_stats {
                    dy[i] - sdy / m - xhat * sdyx / m
                } else {
                    dy[i]
                };
                g.dx[i] = gamma(ci) * invstd[ci] * centred;
            }
        }
    }
    if !config.affine {
        g.dweight.clear();
        g.dbias.clear();
    }
    Ok(g)
}

/// LayerNorm backward given the forward's row `mean` and `rstd`:
///
/// ```text
/// x̂ = (x − mean)·rstd   g = dy·γ   dx = rstd·(g − mean(g) − x̂·mean(g·x̂))   (means over a row)
/// dγ = Σ_rows dy·x̂      dβ = Σ_rows dy
/// ```
pub fn layer_norm_backward(
    x: &[f64],
    dy: &[f64],
    shape: &[usize],
    config: &LayerNormConfig,
    weight: Option<&[f64]>,
    mean: &[f64],
    rstd: &[f64],
) -> Result<RefGrads> {
    let (rows, width) = config.rows_and_width(shape)?;
    let (rows, width) = (rows as usize, width as usize);
    if x.len() != rows * width || dy.len() != x.len() || mean.len() != rows || rstd.len() != rows {
        return Err(Error::shape(
            "layer_norm backward reference",
            "dy",
            shape,
            "x, dy of the shape; mean, rstd of the rows",
        ));
    }
    let gamma = |j: usize| {
        if config.has_weight() {
            weight.map_or(1.0, |w| w[j])
        } else {
            1.0
        }
    };
    let mut out = RefGrads {
        dx: vec![0.0; x.len()],
        dweight: vec![0.0; width],
        dbias: vec![0.0; width],
    };
    for r in 0..rows {
        let at = |j: usize| r * width + j;
        let xhat = |j: usize| (x[at(j)] - mean[r]) * rstd[r];
        // Pass 1: the row means of g and g·x̂; the column sums for γ and β.
        let (mut mg, mut mgx) = (0.0, 0.0);
        for j in 0..width {
            let g = dy[at(j)] * gamma(j);
            mg += g;
            mgx += g * xhat(j);
            out.dweight[j] += dy[at(j)] * xhat(j);
            out.dbias[j] += dy[at(j)];
        }
        mg /= width as f64;
        mgx /= width as f64;
        // Pass 2: dx.
        for j in 0..width {
            out.dx[at(j)] = rstd[r] * (dy[at(j)] * gamma(j) - mg - xhat(j) * mgx);
        }
    }
    if !config.has_weight() {
        out.dweight.clear();
    }
    if !config.has_bias() {
        out.dbias.clear();
    }
    Ok(out)
}

/// Dropout / Dropout2d backward: `dx = dy·m` with the forward's mask and scale, which is the
/// forward applied to `dy` with the same `(seed, offset)` and mode.
pub fn dropout_backward(
    dy: &[f32],
    shape: &[usize],
    config: &DropoutConfig,
    unit: DropoutUnit,
    seed: u64,
    offset: u64,
    training: bool,
) -> Result<Vec<f64>> {
    Ok(dropout_forward(dy, shape, config, unit, seed, offset, training)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_two_channels() {
        // N=2, C=2, S=1: channel 0 = {1, 3}, channel 1 = {2, 6}.
        let x = [1.0, 2.0, 3.0, 6.0];
        let cfg = BatchNormConfig {
            eps: 1e-5,
            ..BatchNormConfig::new(2)
        };
        let mut r = RefRunningStats::new(2);
        let out = batch_norm_forward(&x, &[2, 2], &cfg, None, None, Some(&mut r), true).unwrap();
        assert_eq!(out.mean, vec![2.0, 4.0]);
        // Biased variances 1 and 4.
        assert!((out.invstd[0] - 1.0 / (1.0f64 + 1e-5).sqrt()).abs() < 1e-12);
        assert!((out.invstd[1] - 1.0 / (4.0f64 + 1e-5).sqrt()).abs() < 1e-12);
        // Running: 0.9·0 + 0.1·mean; 0.9·1 + 0.1·unbiased (2 and 8). Momentum is the f32 0.1,
        // 1.5e-9 above the real 0.1, hence the 1e-7 tolerance.
        assert!(
            (r.mean[0] - 0.2).abs() < 1e-7 && (r.mean[1] - 0.4).abs() < 1e-7,
            "{:?}",
            r.mean
        );
        assert!(
            (r.var[0] - 1.1).abs() < 1e-7 && (r.var[1] - 1.7).abs() < 1e-7,
            "{:?}",
            r.var
        );
        assert_eq!(r.num_batches_tracked, 1);
        assert!((out.y[0] + 1.0).abs() < 1e-4 && (out.y[2] - 1.0).abs() < 1e-4);
    }

    #[test]
    fn cumulative_average_uses_incremented_count() {
        let cfg = BatchNormConfig {
            momentum: None,
            ..BatchNormConfig::new(1)
        };
        let mut r = RefRunningStats::new(1);
        batch_norm_forward(&[1.0, 3.0], &[2, 1], &cfg, None, None, Some(&mut r), true).unwrap();
        // First step: factor 1/1 replaces the initial values.
        assert_eq!(r.mean, vec![2.0]);
        assert_eq!(r.var, vec![2.0]);
        batch_norm_forward(&[5.0, 7.0], &[2, 1], &cfg, None, None, Some(&mut r), true).unwrap();
        // Second step: factor 1/2 averages.
        assert_eq!(r.mean, vec![4.0]);
        assert_eq!(r.var, vec![2.0]);
    }

    /// Central differences of `f` at `v`, one coordinate at a time.
    fn numeric_gradient(v: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        let h = 1e-6;
        (0..v.len())
            .map(|i| {
                let (mut up, mut down) = (v.to_vec(), v.to_vec());
                up[i] += h;
                down[i] -= h;
                (f(&up) - f(&down)) / (2.0 * h)
            })
            .collect()
    }

    fn assert_grad(what: &str, analytic: &[f64], numeric: &[f64]) {
        assert_eq!(analytic.len(), numeric.len(), "{what}");
        for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
            assert!(
                (a - n).abs() <= 1e-6 * (1.0 + n.abs()),
                "{what}[{i}]: analytic {a}, numeric {n}"
            );
        }
    }

    /// Deterministic pseudo-random values in [-1, 1) plus `offset`.
    fn values(n: usize, seed: u64, offset: f64) -> Vec<f64> {
        (0..n)
            .map(|i| {
                let z = (i as u64 + 1)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add(seed)
                    .rotate_left(17);
                offset + (z % 2_000_003) as f64 / 1_000_001.5 - 1.0
            })
            .collect()
    }

    #[test]
    fn batch_norm_backward_matches_finite_differences() {
        // Loss L = Σ dy·y. Training (batch statistics, which depend on x) and eval.
        for (shape, offset) in [(vec![2usize, 3, 2], 0.0), (vec![2, 1], 0.0), (vec![3, 2, 3], 5.0)] {
            let c = shape[1];
            let numel: usize = shape.iter().product();
            let x = values(numel, 1, offset);
            let dy = values(numel, 2, 0.0);
            let gamma = values(c, 3, 1.5);
            let beta = values(c, 4, 0.0);
            let config = BatchNormConfig {
                track_running_stats: false,
                ..BatchNormConfig::new(c)
            };
            let loss = |x: &[f64], g: &[f64], b: &[f64]| {
                let y = batch_norm_forward_f64(x, &shape, &config, Some(g), Some(b), None, true)
                    .unwrap()
                    .y;
                y.iter().zip(&dy).map(|(y, d)| y * d).sum::<f64>()
            };
            let fwd = batch_norm_forward_f64(&x, &shape, &config, Some(&gamma), Some(&beta), None, true).unwrap();
            let g = batch_norm_backward(&x, &dy, &shape, &config, Some(&gamma), &fwd.mean, &fwd.invstd, true).unwrap();
            let what = format!("train {shape:?}");
            assert_grad(
                &format!("{what} dx"),
                &g.dx,
                &numeric_gradient(&x, |x| loss(x, &gamma, &beta)),
            );
            assert_grad(
                &format!("{what} dγ"),
                &g.dweight,
                &numeric_gradient(&gamma, |w| loss(&x, w, &beta)),
            );
            assert_grad(
                &format!("{what} dβ"),
                &g.dbias,
                &numeric_gradient(&beta, |b| loss(&x, &gamma, b)),
            );

            // Eval: fixed running statistics.
            let tracked = BatchNormConfig::new(c);
            let running = RefRunningStats {
                mean: values(c, 5, offset),
                var: values(c, 6, 2.0),
                num_batches_tracked: 0,
            };
            let eval_loss = |x: &[f64], g: &[f64]| {
                let mut r = running.clone();
                let y = batch_norm_forward_f64(x, &shape, &tracked, Some(g), Some(&beta), Some(&mut r), false)
                    .unwrap()
                    .y;
                y.iter().zip(&dy).map(|(y, d)| y * d).sum::<f64>()
            };
            let mut r = running.clone();
            let fwd =
                batch_norm_forward_f64(&x, &shape, &tracked, Some(&gamma), Some(&beta), Some(&mut r), false).unwrap();
            let g =
                batch_norm_backward(&x, &dy, &shape, &tracked, Some(&gamma), &fwd.mean, &fwd.invstd, false).unwrap();
            assert_grad(
                &format!("eval {shape:?} dx"),
                &g.dx,
                &numeric_gradient(&x, |x| eval_loss(x, &gamma)),
            );
            assert_grad(
                &format!("eval {shape:?} dγ"),
                &g.dweight,
                &numeric_gradient(&gamma, |w| eval_loss(&x, w)),
            );
        }
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        for (shape, norm, offset) in [
            (vec![3usize, 5], vec![5usize], 0.0),
            (vec![2, 2, 3], vec![2, 3], 4.0),
            (vec![2, 1], vec![1], 0.0),
        ] {
            let config = LayerNormConfig::new(&norm);
            let numel: usize = shape.iter().product();
            let w = config.width();
            let x = values(numel, 7, offset);
            let dy = values(numel, 8, 0.0);
            let gamma = values(w, 9, 1.0);
            let beta = values(w, 10, 0.0);
            let loss = |x: &[f64], g: &[f64], b: &[f64]| {
                let y = layer_norm_forward_f64(x, &shape, &config, Some(g), Some(b)).unwrap().y;
                y.iter().zip(&dy).map(|(y, d)| y * d).sum::<f64>()
            };
            let fwd = layer_norm_forward_f64(&x, &shape, &config, Some(&gamma), Some(&beta)).unwrap();
            let g = layer_norm_backward(&x, &dy, &shape, &config, Some(&gamma), &fwd.mean, &fwd.rstd).unwrap();
            let what = format!("{shape:?}");
            assert_grad(
                &format!("{what} dx"),
                &g.dx,
                &numeric_gradient(&x, |x| loss(x, &gamma, &beta)),
            );
            assert_grad(
                &format!("{what} dγ"),
                &g.dweight,
                &numeric_gradient(&gamma, |w| loss(&x, w, &beta)),
            );
            assert_grad(
                &format!("{what} dβ"),
                &g.dbias,
                &numeric_gradient(&beta, |b| loss(&x, &gamma, b)),
            );
        }
    }

    #[test]
    fn dropout_backward_is_the_masked_scale() {
        // Dropout is linear in x for a fixed mask: dL/dx = dy·m exactly.
        let config = DropoutConfig::new(0.4);
        let shape = [3, 4, 5];
        let x = values(60, 11, 0.0);
        let dy: Vec<f32> = values(60, 12, 0.0).iter().map(|&v| v as f32).collect();
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        for unit in [DropoutUnit::Element, DropoutUnit::Channel] {
            let dx = dropout_backward(&dy, &shape, &config, unit, 5, 6, true).unwrap();
            let (y, mask) = dropout_forward(&xf, &shape, &config, unit, 5, 6, true).unwrap();
            let unit_len = if unit == DropoutUnit::Element { 1 } else { 5 };
            for i in 0..60 {
                let m = if mask[i / unit_len] {
                    f64::from(config.scale(true))
                } else {
                    0.0
                };
                assert_eq!(dx[i], f64::from(dy[i]) * m);
                assert_eq!(y[i], f64::from(xf[i]) * m);
            }
        }
    }
}
