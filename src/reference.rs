//! CPU references for every op, written to be obviously right rather than fast: plain loops,
//! f64 accumulation, two-pass variance. Tests and `normdrop check`/`bench` compare the GPU
//! kernels against these.

use crate::error::{Error, Result};
use crate::kernels::batch_norm::BatchNormConfig;
use crate::kernels::dropout::{DropoutConfig, DropoutUnit};
use crate::kernels::layer_norm::LayerNormConfig;
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
    let at = |ni: usize, ci: usize, si: usize| x[(ni * c + ci) * s + si] as f64;
    let gamma = |ci: usize| {
        if config.affine {
            weight.map_or(1.0, |w| w[ci] as f64)
        } else {
            1.0
        }
    };
    let beta = |ci: usize| {
        if config.affine {
            bias.map_or(0.0, |b| b[ci] as f64)
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
    config.validate()?;
    let (rows, width) = config.rows_and_width(shape)?;
    let (rows, width) = (rows as usize, width as usize);
    let gamma = |j: usize| {
        if config.has_weight() {
            weight.map_or(1.0, |w| f64::from(w[j]))
        } else {
            1.0
        }
    };
    let beta = |j: usize| {
        if config.has_bias() {
            bias.map_or(0.0, |b| f64::from(b[j]))
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
}
