//! The pre-norm transformer residual pattern, fused: `h = residual + dropout(x)`,
//! `y = LayerNorm(h)` in one pass. Then the same mask recomputed on the CPU from the published
//! spec, to show that anyone can reproduce it.
//!
//! Run: `cargo run --example transformer_block`

use normdrop::rng::{mask, DropRule};
use normdrop::{Context, DropoutConfig, LayerNormConfig, ResidualDropoutLayerNorm, Tensor};

fn main() -> normdrop::Result<()> {
    let ctx = Context::new_blocking()?;
    let (tokens, width) = (16, 768);
    let shape = [tokens, width];
    let x: Vec<f32> = (0..tokens * width)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let residual: Vec<f32> = (0..tokens * width)
        .map(|i| ((i * 13 % 97) as f32 / 10.0) + 100.0)
        .collect();

    let seed = 2026;
    let mut block = ResidualDropoutLayerNorm::new(&ctx, LayerNormConfig::new(&[width]), DropoutConfig::new(0.1), seed)?;
    let (xt, rt) = (
        Tensor::from_slice(&ctx, &x, &shape)?,
        Tensor::from_slice(&ctx, &residual, &shape)?,
    );
    let (y, h, gpu_mask) = block.forward_with_mask(&xt, &rt)?;
    let (y, h): (Vec<f32>, Vec<f32>) = (y.to_vec_blocking(&ctx)?, h.to_vec_blocking(&ctx)?);

    let row0 = &y[..width];
    let mean = row0.iter().sum::<f32>() / width as f32;
    let var = row0.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
    println!("row 0 of y: mean {mean:+.2e}, variance {var:.4} (LayerNorm of h)");
    println!("h[0..4] = {:?} (residual + dropout(x))", &h[..4]);

    // The mask is a function of (seed, offset, index): recompute it on the CPU.
    let cpu = mask(seed, 0, tokens * width, DropRule::new(0.1)?);
    let gpu = gpu_mask.to_bools_blocking(&ctx)?;
    let kept = gpu.iter().filter(|&&k| k).count();
    println!(
        "kept {kept} of {} elements ({:.2}%)",
        gpu.len(),
        100.0 * kept as f64 / gpu.len() as f64
    );
    println!("GPU mask equals the CPU recomputation: {}", gpu == cpu);
    println!("generator state after the call: {:?}", block.state());
    Ok(())
}
