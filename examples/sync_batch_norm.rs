//! One data-parallel training step with SyncBatchNorm over MPI: each process is a rank with its
//! own adapter (rank modulo the adapters present) and its own slice of the batch; BatchNorm's
//! statistics span the whole batch, the gradients of γ and β are all-reduced the way a
//! data-parallel trainer does, and every rank takes the same SGD step.
//!
//! Run (Open MPI; as root add `--allow-run-as-root`):
//!
//! ```sh
//! cargo build --release --features mpi --example sync_batch_norm
//! mpirun -n 3 target/release/examples/sync_batch_norm
//! ```

use std::sync::Arc;

use normdrop::sync::{MpiReducer, StatsReducer};
use normdrop::{sgd_step, BatchNormConfig, Context, ContextOptions, SyncBatchNorm, Tensor};

fn main() -> normdrop::Result<()> {
    let universe = mpi::initialize().expect("MPI initializes (run under mpirun)");
    // An MPI communicator stays on its thread: the Arc only shares it within this rank.
    #[allow(clippy::arc_with_non_send_sync)]
    let reducer: Arc<dyn StatsReducer> = Arc::new(MpiReducer::new(universe.world()));
    let (rank, ranks) = (reducer.rank(), reducer.ranks());
    let adapters = Context::adapters_blocking(None);
    let ctx = Context::with_options_blocking(ContextOptions {
        adapter_index: Some(rank % adapters.len().max(1)),
        ..Default::default()
    })?;
    println!("rank {rank}/{ranks}: {}", ctx.adapter_info().name);

    // The global batch is 8 samples of 16 channels × 6 × 6; ranks take uneven slices.
    let (c, plane) = (16, 36);
    let global_n = 8;
    let counts: Vec<usize> = (0..ranks)
        .map(|r| global_n / ranks + usize::from(r < global_n % ranks))
        .collect();
    let start: usize = counts[..rank].iter().sum();
    let n = counts[rank];
    let value = |i: usize, seed: usize| ((i * 2_654_435_761 + seed) % 1000) as f32 / 500.0 - 1.0;
    let x: Vec<f32> = (start * c * plane..(start + n) * c * plane)
        .map(|i| 3.0 + value(i, 1))
        .collect();
    let target: Vec<f32> = (start * c * plane..(start + n) * c * plane)
        .map(|i| value(i, 7))
        .collect();
    let shape = [n, c, 6, 6];

    let mut bn = SyncBatchNorm::new(&ctx, BatchNormConfig::new(c), reducer.clone())?;
    let y: Vec<f32> = bn
        .forward(&Tensor::from_slice(&ctx, &x, &shape)?)?
        .to_vec_blocking(&ctx)?;
    // Loss: mean squared error over the global batch; each rank holds its part of the sum.
    let scale = 2.0 / (global_n * c * plane) as f32;
    let dy: Vec<f32> = y.iter().zip(&target).map(|(a, b)| scale * (a - b)).collect();
    let local_loss: f64 = y.iter().zip(&target).map(|(a, b)| f64::from((a - b) * (a - b))).sum();
    let loss: f64 = reducer.all_gather(&[local_loss])?.iter().sum::<f64>() / (global_n * c * plane) as f64;
    let grads = bn.backward(&Tensor::from_slice(&ctx, &dy, &shape)?)?;

    // The data-parallel gradient all-reduce: dγ and dβ are each rank's own sums.
    let dw: Vec<f32> = grads.dweight.as_ref().expect("affine").to_vec_blocking(&ctx)?;
    let db: Vec<f32> = grads.dbias.as_ref().expect("affine").to_vec_blocking(&ctx)?;
    let sum = |local: &[f32]| -> normdrop::Result<Vec<f32>> {
        let wide: Vec<f64> = local.iter().map(|&v| f64::from(v)).collect();
        let all = reducer.all_gather(&wide)?;
        Ok((0..local.len())
            .map(|i| all.iter().skip(i).step_by(local.len()).sum::<f64>() as f32)
            .collect())
    };
    let (dw, db) = (sum(&dw)?, sum(&db)?);
    sgd_step(
        &ctx,
        bn.weight().expect("affine"),
        &Tensor::from_slice(&ctx, &dw, &[c])?,
        0.1,
    )?;
    sgd_step(
        &ctx,
        bn.bias().expect("affine"),
        &Tensor::from_slice(&ctx, &db, &[c])?,
        0.1,
    )?;

    let running_mean: Vec<f32> = bn.running_mean().expect("tracked").to_vec_blocking(&ctx)?;
    let weight: Vec<f32> = bn.weight().expect("affine").to_vec_blocking(&ctx)?;
    println!(
        "rank {rank}: {n} samples, loss {loss:.5} (global), running_mean[0] {:.6}, γ[0] after the step {:.6}",
        running_mean[0], weight[0]
    );
    // Every rank holds the same running statistics and parameters.
    let bits: Vec<f64> = running_mean
        .iter()
        .chain(&weight)
        .map(|v| f64::from(v.to_bits()))
        .collect();
    let all = reducer.all_gather(&bits)?;
    assert!(
        all.chunks(bits.len()).all(|r| r == &all[..bits.len()]),
        "ranks diverged"
    );
    if rank == 0 {
        println!("all {ranks} ranks hold identical running statistics and parameters");
    }
    drop(bn);
    drop(reducer);
    drop(universe);
    Ok(())
}
