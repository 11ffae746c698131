//! Criterion benches of the BatchNorm forward kernels, for regression tracking. Each iteration
//! records one forward into a fresh encoder, submits it and waits, so the figures include
//! submission overhead; `normdrop bench` (issue 6) reports bandwidth figures.
//!
//! Run: `cargo bench --bench batch_norm`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use normdrop::{BatchNormBuffers, BatchNormConfig, BatchNormKernel, Context, DType, Tensor};

fn batch_norm_forward(c: &mut Criterion) {
    let ctx = Context::new_blocking().expect("a GPU adapter (lavapipe on CPU-only machines)");
    let kernel = ctx.kernel::<BatchNormKernel>().expect("kernel compiles");
    let mut group = c.benchmark_group("batch_norm_forward");
    group.sample_size(10);
    for shape in [[8usize, 64, 32, 32], [32, 16, 28, 28], [4, 512, 7, 7]] {
        let channels = shape[1];
        let numel: usize = shape.iter().product();
        let zeros = |s: &[usize]| Tensor::zeros(&ctx, s, DType::F32).unwrap();
        let x = Tensor::from_slice(&ctx, &(0..numel).map(|i| (i % 97) as f32).collect::<Vec<_>>(), &shape).unwrap();
        let (y, weight, bias, rm, rv) = (
            zeros(&shape),
            zeros(&[channels]),
            zeros(&[channels]),
            zeros(&[channels]),
            zeros(&[channels]),
        );
        let (sm, si, nbt) = (zeros(&[channels]), zeros(&[channels]), zeros(&[2]));
        let plan = kernel
            .plan(ctx.device(), &shape, &BatchNormConfig::new(channels))
            .unwrap();
        let args = BatchNormBuffers {
            x: x.slice(),
            y: y.slice(),
            weight: Some(weight.slice()),
            bias: Some(bias.slice()),
            running_mean: Some(rm.slice()),
            running_var: Some(rv.slice()),
            num_batches_tracked: Some(nbt.slice()),
            save_mean: sm.slice(),
            save_invstd: si.slice(),
            rng: None,
        };
        for (mode, training, bytes_per_elem) in [("train", true, 12u64), ("eval", false, 8)] {
            // Minimal traffic: train 3Es (stats read, normalize read + write), eval 2Es.
            group.throughput(Throughput::Bytes(bytes_per_elem * numel as u64));
            group.bench_with_input(
                BenchmarkId::new(mode, format!("{shape:?}")),
                &training,
                |b, &training| {
                    b.iter(|| {
                        let mut encoder = ctx.device().create_command_encoder(&Default::default());
                        plan.encode(ctx.device(), &mut encoder, training, &args).unwrap();
                        ctx.queue().submit([encoder.finish()]);
                        ctx.synchronize().unwrap();
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, batch_norm_forward);
criterion_main!(benches);
