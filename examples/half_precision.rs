//! f16 activations: a LayerNorm → dropout block forward and backward in half precision, on
//! whichever f16 path the device has (native `shader-f16`, or halves packed in u32), and the
//! same block on the packed path for comparison. Parameters and statistics stay f32.
//!
//! Run: `cargo run --example half_precision`

use half::f16;
use normdrop::{Context, ContextOptions, DType, DropoutConfig, LayerNormConfig, LayerNormDropout, Tensor};

fn run(ctx: &Context, x: &[f16], shape: &[usize]) -> normdrop::Result<(Vec<f16>, Vec<f16>)> {
    let width = shape[shape.len() - 1];
    let mut block = LayerNormDropout::new(ctx, LayerNormConfig::new(&[width]), DropoutConfig::new(0.1), 42)?;
    let y = block.forward(&Tensor::from_slice(ctx, x, shape)?)?;
    assert_eq!(y.dtype(), DType::F16);
    let dy = vec![f16::from_f32(1.0); x.len()];
    let grads = block.backward(&Tensor::from_slice(ctx, &dy, shape)?)?;
    // dγ and dβ are f32, whatever the activations' dtype.
    let dgamma: Vec<f32> = grads.dweight.expect("affine").to_vec_blocking(ctx)?;
    println!("  dγ[0..4] = {:?}", &dgamma[..4]);
    Ok((y.to_vec_blocking(ctx)?, grads.dx.to_vec_blocking(ctx)?))
}

fn main() -> normdrop::Result<()> {
    let ctx = Context::new_blocking()?;
    let shape = [4, 769]; // an odd width: rows share packed words
    let x: Vec<f16> = (0..4 * 769)
        .map(|i| f16::from_f32(((i * 37) % 101) as f32 / 25.0 - 2.0))
        .collect();

    println!(
        "{} ({:?}): f16 stored as {:?}",
        ctx.adapter_info().name,
        ctx.adapter_info().backend,
        ctx.storage(DType::F16)
    );
    let (y, dx) = run(&ctx, &x, &shape)?;

    let packed = Context::with_options_blocking(ContextOptions {
        force_packed_f16: true,
        ..Default::default()
    })?;
    println!("forced fallback: f16 stored as {:?}", packed.storage(DType::F16));
    let (y2, dx2) = run(&packed, &x, &shape)?;

    // Same mask, same math in f32: the two paths agree to within one f16 rounding.
    let diff = |a: &[f16], b: &[f16]| {
        a.iter()
            .zip(b)
            .map(|(p, q)| (p.to_f32() - q.to_f32()).abs())
            .fold(0.0f32, f32::max)
    };
    println!(
        "max |y − y_packed| = {:.2e}, max |dx − dx_packed| = {:.2e}",
        diff(&y, &y2),
        diff(&dx, &dx2)
    );
    println!("y[0..6] = {:?}", &y[..6]);
    Ok(())
}
