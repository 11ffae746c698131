//! A PyTorch-style BatchNorm2d: a few training steps, then eval, then save and reload the state.
//!
//! Run: `cargo run --example batch_norm_module`

use normdrop::{BatchNorm, Context, Tensor};

fn main() -> normdrop::Result<()> {
    let ctx = Context::new_blocking()?;
    println!(
        "adapter: {} ({:?})",
        ctx.adapter_info().name,
        ctx.adapter_info().backend
    );

    // nn.BatchNorm2d(3): eps 1e-5, momentum 0.1, affine, tracking running statistics.
    let mut bn = BatchNorm::new(&ctx, 3)?;
    let shape = [8, 3, 16, 16];
    let numel: usize = shape.iter().product();

    for step in 0..3 {
        // Channel c of this batch has mean ≈ c + step and a spread that grows with c.
        let x: Vec<f32> = (0..numel)
            .map(|i| {
                let c = (i / 256) % 3;
                let wobble = ((i * 7919) % 101) as f32 / 101.0 - 0.5;
                (c + step) as f32 + wobble * (1.0 + c as f32)
            })
            .collect();
        let y = bn.forward(&Tensor::from_slice(&ctx, &x, &shape)?)?;
        let y: Vec<f32> = y.to_vec_blocking(&ctx)?;
        // Channel 1 of y: mean ≈ 0 and std ≈ 1 after batch normalization (γ = 1, β = 0).
        let ch1: Vec<f32> = y.chunks(256).skip(1).step_by(3).flatten().copied().collect();
        let mean = ch1.iter().sum::<f32>() / ch1.len() as f32;
        let std = (ch1.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / ch1.len() as f32).sqrt();
        println!("step {step}: channel 1 of y has mean {mean:+.4} and std {std:.4}");
    }
    let running_mean: Vec<f32> = bn.running_mean().expect("tracking").to_vec_blocking(&ctx)?;
    let running_var: Vec<f32> = bn.running_var().expect("tracking").to_vec_blocking(&ctx)?;
    println!("running_mean {running_mean:?}");
    println!("running_var  {running_var:?}");
    println!("num_batches_tracked {:?}", bn.num_batches_tracked_blocking()?);

    // Eval: normalizes with the running statistics and leaves them alone.
    bn.eval();
    let y = bn.forward(&Tensor::from_slice(&ctx, &vec![1.0f32; numel], &shape)?)?;
    println!("eval y[0] for x = 1: {:+.4}", y.to_vec_blocking::<f32>(&ctx)?[0]);

    // State with PyTorch's key names; `torch.nn.BatchNorm2d(3).load_state_dict(
    // safetensors.torch.load_file(path))` reads it.
    let path = std::env::temp_dir().join("normdrop-bn-example.safetensors");
    bn.save_state(&path)?;
    let mut restored = BatchNorm::new(&ctx, 3)?;
    restored.load_state(&path)?;
    println!("saved and restored state via {}", path.display());
    Ok(())
}
