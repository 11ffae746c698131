//! A pre-norm transformer block's norms as language models write them, on the GPU: the residual
//! stream `h = residual + dropout(x)` and `y = RMSNorm(h)` in one fused pass, checked against
//! the same computation unfused (Dropout, an add on the host, RMSNorm), then the backward with
//! the gradient arriving at `h` from the next residual add.
//!
//! Run: `cargo run --example rms_norm_block`

use normdrop::{Context, DropoutConfig, ResidualDropoutRmsNorm, RmsNorm, RmsNormConfig, Tensor};

fn main() -> normdrop::Result<()> {
    let ctx = Context::new_blocking()?;
    let (tokens, width) = (64, 512);
    let shape = [tokens, width];
    let values = |seed: u32| -> Vec<f32> {
        (0..tokens * width)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    };
    let (x, residual, dy) = (values(1), values(2), values(3));
    let gamma: Vec<f32> = (0..width).map(|j| 1.0 + 0.001 * j as f32).collect();
    let dropout = DropoutConfig::new(0.1);
    let seed = 42;

    // Fused: one pass writes h and y.
    let mut block = ResidualDropoutRmsNorm::new(&ctx, RmsNormConfig::new(&[width]), dropout, seed)?;
    block.rms_norm_mut().set_weight(&gamma)?;
    let (xt, rt) = (
        Tensor::from_slice(&ctx, &x, &shape)?,
        Tensor::from_slice(&ctx, &residual, &shape)?,
    );
    let (y, h) = block.forward(&xt, &rt)?;

    // Unfused: the same dropout (same seed and offset, so the same mask), the add on the host,
    // then RMSNorm.
    let mut drop = normdrop::Dropout::with_config(&ctx, dropout, seed)?;
    let dropped: Vec<f32> = drop.forward(&xt)?.to_vec_blocking(&ctx)?;
    let h_unfused: Vec<f32> = residual.iter().zip(&dropped).map(|(r, d)| r + d).collect();
    let mut rms = RmsNorm::new(&ctx, &[width])?;
    rms.set_weight(&gamma)?;
    let y_unfused = rms.forward(&Tensor::from_slice(&ctx, &h_unfused, &shape)?)?;

    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
    let (h, y, y_unfused) = (
        h.to_vec_blocking::<f32>(&ctx)?,
        y.to_vec_blocking::<f32>(&ctx)?,
        y_unfused.to_vec_blocking::<f32>(&ctx)?,
    );
    println!(
        "h: fused vs unfused, largest difference {:.2e}",
        max_diff(&h, &h_unfused)
    );
    println!(
        "y: fused vs unfused, largest difference {:.2e}",
        max_diff(&y, &y_unfused)
    );
    assert!(
        max_diff(&h, &h_unfused) == 0.0,
        "the fused block draws the unfused dropout's mask"
    );
    assert!(max_diff(&y, &y_unfused) < 1e-5);

    // Backward, with the gradient reaching h from the next residual add.
    let dyt = Tensor::from_slice(&ctx, &dy, &shape)?;
    let dh_in = Tensor::from_slice(&ctx, &values(4), &shape)?;
    let grads = block.backward(&dyt, Some(&dh_in))?;
    let dgamma = grads
        .dweight
        .expect("RMSNorm with elementwise_affine has γ")
        .to_vec_blocking::<f32>(&ctx)?;
    let dres = grads.dresidual.to_vec_blocking::<f32>(&ctx)?;
    println!(
        "backward: |dresidual|_1 = {:.3}, dγ[0..4] = {:?}",
        dres.iter().map(|v| v.abs()).sum::<f32>(),
        &dgamma[..4]
    );
    Ok(())
}
