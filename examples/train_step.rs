//! A training loop on the GPU: BatchNorm forward, loss, backward, and an SGD update of γ and β,
//! on a toy problem whose answer is known. The loss goes down step by step.
//!
//! Toy problem: each batch `x` of shape (32, 4, 16) has per-channel means and spreads; the
//! target is `a_c·x̂ + b_c` with `x̂` the batch-normalized input, so BatchNorm fits it exactly
//! with γ = a and β = b. We start from γ = 1, β = 0, and learn.
//!
//! Run: `cargo run --example train_step`

use normdrop::{sgd_step, BatchNorm, Context, Tensor};

/// A tiny deterministic generator for the toy data.
struct Lcg(u64);

impl Lcg {
    fn normal(&mut self) -> f32 {
        // Sum of 12 uniforms minus 6: close enough to a standard normal for a toy.
        (0..12)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (self.0 >> 40) as f32 / (1u64 << 24) as f32
            })
            .sum::<f32>()
            - 6.0
    }
}

fn main() -> normdrop::Result<()> {
    let ctx = Context::new_blocking()?;
    let (n, c, l) = (32, 4, 16);
    let shape = [n, c, l];
    let numel = n * c * l;
    let (a, b) = ([2.0f32, -0.5, 1.5, 0.25], [0.3f32, -1.0, 0.0, 2.0]);
    let (means, spreads) = ([5.0f32, -3.0, 0.0, 100.0], [2.0f32, 0.5, 1.0, 0.1]);
    let mut bn = BatchNorm::new(&ctx, c)?;
    let mut rng = Lcg(7);
    let lr = 1.0;

    for step in 0..8 {
        // A fresh batch and its target.
        let x: Vec<f32> = (0..numel)
            .map(|i| means[(i / l) % c] + spreads[(i / l) % c] * rng.normal())
            .collect();
        let target = toy_target(&x, &shape, &a, &b);

        // Forward on the GPU, loss on the host: L = mean((y − t)²), dL/dy = 2(y − t)/numel.
        let y: Vec<f32> = bn
            .forward(&Tensor::from_slice(&ctx, &x, &shape)?)?
            .to_vec_blocking(&ctx)?;
        let loss = y.iter().zip(&target).map(|(y, t)| (y - t) * (y - t)).sum::<f32>() / numel as f32;
        let dy: Vec<f32> = y
            .iter()
            .zip(&target)
            .map(|(y, t)| 2.0 * (y - t) / numel as f32)
            .collect();

        // Backward and the update, both on the GPU.
        let grads = bn.backward(&Tensor::from_slice(&ctx, &dy, &shape)?)?;
        let (weight, bias) = (bn.weight().expect("affine").clone(), bn.bias().expect("affine").clone());
        sgd_step(&ctx, &weight, grads.dweight.as_ref().expect("affine"), lr)?;
        sgd_step(&ctx, &bias, grads.dbias.as_ref().expect("affine"), lr)?;

        let gamma: Vec<f32> = weight.to_vec_blocking(&ctx)?;
        println!("step {step}: loss {loss:.6}   γ = {gamma:.3?}");
    }
    let beta: Vec<f32> = bn.bias().expect("affine").to_vec_blocking(&ctx)?;
    println!("learned β = {beta:.3?} (target {b:?}); γ target {a:?}");
    Ok(())
}

/// `a_c·x̂ + b_c` with x̂ normalized by the batch's own per-channel statistics (biased variance).
fn toy_target(x: &[f32], shape: &[usize; 3], a: &[f32], b: &[f32]) -> Vec<f32> {
    let [n, c, l] = *shape;
    let mut out = vec![0.0; x.len()];
    for ci in 0..c {
        let idx: Vec<usize> = (0..n)
            .flat_map(|ni| (0..l).map(move |li| (ni * c + ci) * l + li))
            .collect();
        let mean = idx.iter().map(|&i| f64::from(x[i])).sum::<f64>() / idx.len() as f64;
        let var = idx.iter().map(|&i| (f64::from(x[i]) - mean).powi(2)).sum::<f64>() / idx.len() as f64;
        for &i in &idx {
            let xhat = (f64::from(x[i]) - mean) / (var + 1e-5).sqrt();
            out[i] = (f64::from(a[ci]) * xhat + f64::from(b[ci])) as f32;
        }
    }
    out
}
