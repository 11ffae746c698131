//! Criterion benches of every op, for regression tracking. They use the same runners as
//! `normdrop bench` (buffers allocated once, inputs rotated) at small shapes that a CPU driver
//! handles; each iteration records one call, submits and waits, so the figures include
//! submission overhead. `normdrop bench` reports bandwidth against the copy kernel.
//!
//! Run: `cargo bench --bench kernels` (one op: `cargo bench --bench kernels -- layer_norm_forward`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use normdrop::Context;
use normdrop_cli::runners::{self, Family, OPS};

fn kernels(c: &mut Criterion) {
    let ctx = Context::new_blocking().expect("a GPU adapter (lavapipe on CPU-only machines)");
    let mut group = c.benchmark_group("normdrop");
    group.sample_size(10);
    for spec in OPS {
        let shape: &[usize] = match spec.family {
            Family::BatchNorm => &[8, 32, 28, 28],
            Family::LayerNorm => &[512, 768],
            Family::Dropout => &[1 << 20],
            Family::GroupNorm => &[8, 64, 28, 28],
        };
        let numel: u64 = shape.iter().map(|&d| d as u64).product();
        let runner = runners::build(&ctx, spec.name, shape, runners::rotation_sets(numel * 4)).expect("op builds");
        group.throughput(Throughput::Bytes(runner.bytes));
        let mut call = 0;
        group.bench_function(BenchmarkId::new(spec.name, format!("{shape:?}")), |b| {
            b.iter(|| {
                let mut encoder = ctx.device().create_command_encoder(&Default::default());
                runner.encode(ctx.device(), &mut encoder, call).expect("encodes");
                call += 1;
                ctx.queue().submit([encoder.finish()]);
                ctx.synchronize().expect("device wait");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
