//! GroupNorm as diffusion U-Nets use it (32 groups over the channels of a feature map) and
//! InstanceNorm (one group per channel), forward and backward on the GPU, checked against the
//! f64 CPU reference; then a few SGD steps that pull GroupNorm's output towards a target.
//!
//! Run: `cargo run --example group_norm`

use normdrop::reference::{group_norm_backward, group_norm_forward};
use normdrop::{sgd_step, Context, GroupNorm, GroupNormConfig, InstanceNorm, Tensor};

fn max_err(got: &[f32], exp: &[f64]) -> f64 {
    got.iter()
        .zip(exp)
        .map(|(&g, e)| (f64::from(g) - e).abs())
        .fold(0.0, f64::max)
}

fn main() -> normdrop::Result<()> {
    let ctx = Context::new_blocking()?;
    let shape = [2, 64, 16, 16];
    let n: usize = shape.iter().product();
    let values = |seed: u32, scale: f32, offset: f32| -> Vec<f32> {
        (0..n)
            .map(|i| {
                let u = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32;
                offset + scale * (u - 0.5)
            })
            .collect()
    };
    let (x, dy) = (values(1, 4.0, 3.0), values(2, 1.0, 0.0));
    let xt = Tensor::from_slice(&ctx, &x, &shape)?;
    let dyt = Tensor::from_slice(&ctx, &dy, &shape)?;
    let wide = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();

    // GroupNorm(32, 64): statistics per (sample, group of 2 channels) over 2 × 16 × 16 values.
    let mut gn = GroupNorm::new(&ctx, 32, 64)?;
    let gamma: Vec<f32> = (0..64).map(|c| 1.0 + 0.01 * c as f32).collect();
    let beta: Vec<f32> = (0..64).map(|c| 0.1 - 0.002 * c as f32).collect();
    gn.set_weight(&gamma)?;
    gn.set_bias(&beta)?;
    let y = gn.forward(&xt)?;
    let grads = gn.backward(&dyt)?;
    let config = GroupNormConfig::new(32, 64);
    let f = group_norm_forward(&wide(&x), &shape, &config, Some(&wide(&gamma)), Some(&wide(&beta)))?;
    let g = group_norm_backward(
        &wide(&x),
        &wide(&dy),
        &shape,
        &config,
        Some(&wide(&gamma)),
        &f.mean,
        &f.rstd,
    )?;
    let errors = [
        ("y", max_err(&y.to_vec_blocking(&ctx)?, &f.y)),
        ("dx", max_err(&grads.dx.to_vec_blocking(&ctx)?, &g.dx)),
        (
            "dγ",
            max_err(
                &grads.dweight.as_ref().expect("affine").to_vec_blocking(&ctx)?,
                &g.dweight,
            ),
        ),
        (
            "dβ",
            max_err(&grads.dbias.as_ref().expect("affine").to_vec_blocking(&ctx)?, &g.dbias),
        ),
    ];
    println!("GroupNorm(32, 64) on {shape:?}, largest error against the f64 reference:");
    for (what, e) in errors {
        println!("  {what:<3} {e:.2e}");
        assert!(e < 1e-4, "{what}: {e}");
    }

    // InstanceNorm2d(64): G = C, no affine parameters by default.
    let mut inorm = InstanceNorm::new(&ctx, 64)?;
    let yi: Vec<f32> = inorm.forward(&xt)?.to_vec_blocking(&ctx)?;
    let plane = 16 * 16;
    let worst_mean = yi
        .chunks(plane)
        .map(|p| (p.iter().map(|&v| f64::from(v)).sum::<f64>() / plane as f64).abs())
        .fold(0.0, f64::max);
    println!("InstanceNorm(64): largest |mean| of a normalized plane {worst_mean:.1e}");
    assert!(worst_mean < 1e-5);

    // Training: SGD on γ and β towards an output of 0.5 everywhere (γ shrinks, β grows).
    let target = vec![0.5f32; n];
    let mut last = f64::INFINITY;
    for step in 0..5 {
        let y: Vec<f32> = gn.forward(&xt)?.to_vec_blocking(&ctx)?;
        let dy: Vec<f32> = y.iter().zip(&target).map(|(a, b)| 2.0 * (a - b) / n as f32).collect();
        let loss: f64 = y
            .iter()
            .zip(&target)
            .map(|(a, b)| f64::from((a - b) * (a - b)))
            .sum::<f64>()
            / n as f64;
        println!("step {step}: loss {loss:.5}");
        assert!(loss < last, "the loss falls");
        last = loss;
        let grads = gn.backward(&Tensor::from_slice(&ctx, &dy, &shape)?)?;
        sgd_step(
            &ctx,
            gn.weight().expect("affine"),
            grads.dweight.as_ref().expect("affine"),
            0.5,
        )?;
        sgd_step(
            &ctx,
            gn.bias().expect("affine"),
            grads.dbias.as_ref().expect("affine"),
            0.5,
        )?;
    }
    Ok(())
}
