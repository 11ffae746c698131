//! BatchNorm forward on the GPU against PyTorch fixtures and the f64 CPU reference.

mod common;

use common::{assert_close, Rng};
use normdrop::kernels::rng_state_bytes;
use normdrop::reference::{batch_norm_backward, batch_norm_forward, dropout_forward, widen, RefRunningStats};
use normdrop::tuning::{BatchNormBackwardPlanOptions, BatchNormPlanOptions, ReduceSplit, MAX_NORMALIZE_RUN};
use normdrop::{
    Accumulate, BatchNorm, BatchNormBackwardBuffers, BatchNormBackwardKernel, BatchNormBuffers, BatchNormConfig,
    BatchNormKernel, Context, ContextOptions, DType, DropoutConfig, DropoutMode, DropoutUnit, Error, Tensor,
};
use normdrop_cli::fixture::{self, Fixture, Verdict};
use proptest::prelude::*;
use wgpu::util::DeviceExt;

const RTOL: f64 = 1e-4;
const ATOL: f64 = 1e-5;
/// Tolerance for off-centre inputs (`1000 + 0.1·randn`): 50x tighter than the `*_offset`
/// fixtures allow, which the kernels meet by taking statistics around a value of the data.
const OFFSET_TOL: f64 = 1e-4;

// ---------------------------------------------------------------------------------------------
// PyTorch fixtures

#[test]
fn batch_norm_fixtures_pass_including_gradients() {
    let ctx = gpu!();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/torch");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("bn"))
        .collect();
    files.sort();
    assert!(files.len() >= 9, "expected the batch_norm fixtures in {dir}");
    let mut passed = 0;
    for path in files {
        let fx = Fixture::load(&path).unwrap();
        assert_eq!(fx.op, "batch_norm");
        for line in fixture::check(&ctx, &fx).unwrap() {
            match &line.verdict {
                Verdict::Pass(_) => passed += 1,
                _ => panic!("{line}"),
            }
        }
    }
    assert_eq!(
        passed, 78,
        "forward outputs, saved and running statistics, and gradients"
    );
}

// ---------------------------------------------------------------------------------------------
// Low-level kernel against the CPU reference

/// Every buffer of one low-level call, as tensors.
struct Bufs {
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    nbt: wgpu::Buffer,
    save_mean: Tensor,
    save_invstd: Tensor,
}

impl Bufs {
    fn new(ctx: &Context, x: &[f32], shape: &[usize], weight: &[f32], bias: &[f32], run: &RefRunningStats) -> Self {
        let c = shape[1];
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        let nbt = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 8,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ctx.queue()
            .write_buffer(&nbt, 0, &run.num_batches_tracked.to_le_bytes());
        Self {
            x: Tensor::from_slice(ctx, x, shape).unwrap(),
            y: Tensor::zeros(ctx, shape, DType::F32).unwrap(),
            weight: Tensor::from_slice(ctx, weight, &[c]).unwrap(),
            bias: Tensor::from_slice(ctx, bias, &[c]).unwrap(),
            running_mean: Tensor::from_slice(ctx, &f32s(&run.mean), &[c]).unwrap(),
            running_var: Tensor::from_slice(ctx, &f32s(&run.var), &[c]).unwrap(),
            nbt,
            save_mean: Tensor::zeros(ctx, &[c], DType::F32).unwrap(),
            save_invstd: Tensor::zeros(ctx, &[c], DType::F32).unwrap(),
        }
    }

    fn args(&self) -> BatchNormBuffers<'_> {
        BatchNormBuffers {
            x: self.x.slice(),
            y: self.y.slice(),
            weight: Some(self.weight.slice()),
            bias: Some(self.bias.slice()),
            running_mean: Some(self.running_mean.slice()),
            running_var: Some(self.running_var.slice()),
            num_batches_tracked: Some(self.nbt.slice(..)),
            save_mean: self.save_mean.slice(),
            save_invstd: self.save_invstd.slice(),
            rng: None,
        }
    }

    fn count(&self, ctx: &Context) -> u64 {
        let b = pollster::block_on(ctx.read_buffer(&self.nbt, 0, 8)).unwrap();
        u64::from_le_bytes(b[..8].try_into().unwrap())
    }
}

fn read(ctx: &Context, t: &Tensor) -> Vec<f32> {
    t.to_vec_blocking(ctx).unwrap()
}

/// Runs one low-level forward with `split` and checks y, saved stats, running stats and the
/// counter against the reference.
#[allow(clippy::too_many_arguments)]
fn check_against_reference(
    ctx: &Context,
    shape: &[usize],
    config: &BatchNormConfig,
    training: bool,
    split: ReduceSplit,
    offset: f64,
    seed: u64,
    tol: (f64, f64),
) {
    let options = BatchNormPlanOptions {
        split: Some(split),
        ..Default::default()
    };
    check_with_options(ctx, shape, config, training, &options, offset, seed, tol);
}

/// Generator offset of the fused dropout in [`check_with_options`].
const DROP_OFFSET: u64 = 5;

/// [`check_against_reference`] with any plan options. With a fused dropout, y is checked
/// against the reference's y through the CPU dropout (seed `seed`, offset [`DROP_OFFSET`]).
#[allow(clippy::too_many_arguments)]
fn check_with_options(
    ctx: &Context,
    shape: &[usize],
    config: &BatchNormConfig,
    training: bool,
    options: &BatchNormPlanOptions,
    offset: f64,
    seed: u64,
    tol: (f64, f64),
) {
    let mut rng = Rng::new(seed);
    let c = shape[1];
    let numel: usize = shape.iter().product();
    let x = rng.normal_vec(numel, offset, if offset == 0.0 { 1.0 } else { 0.1 });
    let weight = rng.normal_vec(c, 1.0, 0.5);
    let bias = rng.normal_vec(c, 0.0, 0.5);
    let mut run = RefRunningStats {
        mean: (0..c).map(|_| rng.normal() * 0.1).collect(),
        var: (0..c).map(|_| 0.5 + rng.uniform()).collect(),
        num_batches_tracked: 3,
    };
    // The GPU starts from the f32-rounded running stats; make the reference do the same.
    run.mean.iter_mut().for_each(|v| *v = f64::from(*v as f32));
    run.var.iter_mut().for_each(|v| *v = f64::from(*v as f32));
    let bufs = Bufs::new(ctx, &x, shape, &weight, &bias, &run);
    let what = format!("shape {shape:?} {config:?} training={training} {options:?}");

    let kernel = ctx.kernel::<BatchNormKernel>().unwrap();
    let plan = kernel.plan_with(ctx.device(), shape, config, options).unwrap();
    let reference = batch_norm_forward(&x, shape, config, Some(&weight), Some(&bias), Some(&mut run), training);
    let state = ctx.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: &rng_state_bytes(seed, DROP_OFFSET),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let args = BatchNormBuffers {
        rng: Some(state.slice(..)),
        ..bufs.args()
    };
    let encoded = plan.encode(ctx.device(), &mut encoder, training, &args);
    let reference = match reference {
        Ok(mut r) => {
            encoded.unwrap_or_else(|e| panic!("{what}: {e}"));
            if let Some(d) = &options.dropout {
                let y: Vec<f32> = r.y.iter().map(|&v| v as f32).collect();
                let unit = DropoutUnit::Element;
                r.y = dropout_forward(&y, shape, d, unit, seed, DROP_OFFSET, training)
                    .unwrap()
                    .0;
            }
            r
        }
        Err(_) => {
            // Only the "one value per channel" case is rejected, and by both sides.
            assert!(matches!(encoded, Err(Error::Shape { .. })), "{what}: {encoded:?}");
            return;
        }
    };
    ctx.queue().submit([encoder.finish()]);
    let (rtol, atol) = tol;
    assert_close(&format!("{what} y"), &read(ctx, &bufs.y), &reference.y, rtol, atol);
    assert_close(
        &format!("{what} save_mean"),
        &read(ctx, &bufs.save_mean),
        &reference.mean,
        rtol,
        atol,
    );
    assert_close(
        &format!("{what} save_invstd"),
        &read(ctx, &bufs.save_invstd),
        &reference.invstd,
        rtol,
        atol,
    );
    if config.track_running_stats {
        assert_close(
            &format!("{what} running_mean"),
            &read(ctx, &bufs.running_mean),
            &run.mean,
            rtol,
            atol,
        );
        assert_close(
            &format!("{what} running_var"),
            &read(ctx, &bufs.running_var),
            &run.var,
            rtol,
            atol,
        );
        assert_eq!(bufs.count(ctx), run.num_batches_tracked, "{what}");
    }
}

/// No dropout, and a fused dropout in each scaling mode.
fn dropout_choices() -> [Option<DropoutConfig>; 3] {
    [
        None,
        Some(DropoutConfig::new(0.4)),
        Some(DropoutConfig {
            p: 0.3,
            mode: DropoutMode::ScaleAtInference,
        }),
    ]
}

/// Shapes for the one-pass-per-channel tests: planes narrower than the subgroup's 8 quads, wider,
/// and not a multiple of 8 or 24 quads; one sample and several.
const CHANNEL_SHAPES: [&[usize]; 4] = [&[2, 3, 4], &[3, 5, 36], &[1, 2, 4, 60], &[4, 7, 132]];

fn config(c: usize, momentum: Option<f32>, affine: bool, track: bool, eps: f32) -> BatchNormConfig {
    BatchNormConfig {
        num_features: c,
        eps,
        momentum,
        affine,
        track_running_stats: track,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn gpu_matches_reference_on_random_shapes(
        n in 1usize..6,
        c in 1usize..24,
        spatial in prop::collection::vec(1usize..14, 0..3),
        affine: bool,
        track: bool,
        momentum in prop_oneof![Just(None), (0.0f32..=1.0).prop_map(Some)],
        eps in prop_oneof![Just(1e-5f32), Just(1e-3), Just(0.5)],
        training: bool,
        split in common::reduce_splits(),
        off_centre: bool,
        seed: u64,
    ) {
        let Some(ctx) = common::ctx() else { return Ok(()) };
        let mut shape = vec![n, c];
        shape.extend(spatial);
        let (offset, tol) = if off_centre { (1000.0, (OFFSET_TOL, OFFSET_TOL)) } else { (0.0, (RTOL, ATOL)) };
        let cfg = config(c, momentum, affine, track, eps);
        check_against_reference(&ctx, &shape, &cfg, training, split, offset, seed, tol);
    }
}

#[test]
fn pinned_awkward_shapes() {
    let ctx = gpu!();
    let cfg = |c| config(c, Some(0.1), true, true, 1e-5);
    // (shape, workgroup chunk): M = 2; primes; widths that are not multiples of 4 or 256;
    // exactly one chunk; one element past a chunk. Each also with invocation chunks of one
    // quad, of three quads (chunks cross samples when S is not a multiple of 12), and 256.
    for (shape, chunk) in [
        (vec![2, 3], 256),
        (vec![1, 3, 2], 256),
        (vec![7, 13, 31, 17], 256),
        (vec![3, 5, 257], 256),
        (vec![1, 2, 256], 256),
        (vec![1, 2, 257], 256),
        (vec![2, 1000], 4096),
        (vec![5, 3, 3, 3, 3], 512),
    ] {
        let splits = [
            ReduceSplit::Workgroup { chunk },
            ReduceSplit::Invocation { chunk: 4 },
            ReduceSplit::Invocation { chunk: 12 },
            ReduceSplit::Invocation { chunk: 256 },
        ];
        for split in splits {
            check_against_reference(&ctx, &shape, &cfg(shape[1]), true, split, 0.0, 7, (RTOL, ATOL));
            check_against_reference(&ctx, &shape, &cfg(shape[1]), false, split, 0.0, 8, (RTOL, ATOL));
        }
    }
}

/// The normalize pass's runs of quads per invocation (1, the GPU default; 8, the CPU default;
/// others), plain and fused with dropout, on shapes whose runs start mid-channel, cross one or
/// several channels (S < 4, S not a multiple of 4) and end past the tensor; refused outside
/// 1..=MAX_NORMALIZE_RUN before anything is built. S % 4 == 0 with S ≥ 4·run takes the aligned
/// entry points: S = 8 (run 2 ends exactly at a channel's end), 12 (run 2 enters the next
/// channel mid-run, run 3 fills a channel), 36 (run 8 enters the next channel mid-run, the last
/// channel's next is channel 0 of the next sample).
#[test]
fn normalize_runs_match_the_reference() {
    let ctx = gpu!();
    let drops = dropout_choices();
    for shape in [
        vec![2, 3, 1],
        vec![3, 2, 3],
        vec![2, 3, 7, 5],
        vec![4, 2, 36],
        vec![3, 4, 8],
        vec![2, 5, 12],
        vec![3, 5, 257],
    ] {
        let cfg = config(shape[1], Some(0.1), true, true, 1e-5);
        for run in [1, 2, 3, 8, MAX_NORMALIZE_RUN] {
            for (i, dropout) in drops.iter().enumerate() {
                let options = BatchNormPlanOptions {
                    normalize_run: Some(run),
                    dropout: *dropout,
                    ..Default::default()
                };
                for training in [true, false] {
                    let seed = 60 + i as u64;
                    check_with_options(&ctx, &shape, &cfg, training, &options, 0.0, seed, (RTOL, ATOL));
                }
            }
        }
    }
    let kernel = ctx.kernel::<BatchNormKernel>().unwrap();
    let cfg = config(3, Some(0.1), true, true, 1e-5);
    for run in [0, MAX_NORMALIZE_RUN + 1] {
        let options = BatchNormPlanOptions {
            normalize_run: Some(run),
            ..Default::default()
        };
        let r = kernel.plan_with(ctx.device(), &[2, 3, 4], &cfg, &options);
        assert!(matches!(r, Err(Error::InvalidArgument { .. })), "run {run}: {r:?}");
    }
}

#[test]
fn off_centre_large_m_is_stable() {
    let ctx = gpu!();
    // 1000 + 0.1·randn: E[x²] − E[x]² loses every digit here; Welford + Chan does not, with
    // partials from 256-invocation workgroups or from single invocations (16384 one-quad
    // chunks per channel merged in order by one invocation).
    let cfg = config(4, Some(0.1), true, true, 1e-5);
    let splits = [
        ReduceSplit::Workgroup { chunk: 4096 },
        ReduceSplit::Workgroup { chunk: 256 },
        ReduceSplit::Invocation { chunk: 4 },
        ReduceSplit::Invocation { chunk: 1000 },
    ];
    for (seed, split) in (11..).zip(splits) {
        check_against_reference(
            &ctx,
            &[16, 4, 64, 64],
            &cfg,
            true,
            split,
            1000.0,
            seed,
            (OFFSET_TOL, OFFSET_TOL),
        );
    }
}

#[test]
fn workgroup_reductions_with_and_without_subgroups_match_the_reference() {
    // The shared context requests SUBGROUP wherever the adapter has it (lavapipe's Vulkan
    // does; GL does not), so its ReduceSplit::Workgroup passes merge with subgroup operations;
    // a second context with subgroups disabled runs the workgroup-memory fallback on the same
    // adapter. Both against the reference (the backward's sums: tests/backward.rs), centred
    // and off-centre, with chunks that leave invocations without data.
    let shared = gpu!();
    let plain = common::ctx_without(wgpu::Features::SUBGROUP);
    eprintln!(
        "shared context has SUBGROUP: {}",
        shared.features().contains(wgpu::Features::SUBGROUP)
    );
    for ctx in [&shared, &plain] {
        for (i, (shape, chunk)) in [
            (vec![7, 13, 31, 17], 256),
            (vec![2, 3, 1000], 4096),
            (vec![16, 4, 64, 64], 1024),
        ]
        .into_iter()
        .enumerate()
        {
            let c = shape[1];
            let split = ReduceSplit::Workgroup { chunk };
            let cfg = config(c, Some(0.1), true, true, 1e-5);
            check_against_reference(ctx, &shape, &cfg, true, split, 0.0, 40 + i as u64, (RTOL, ATOL));
            check_against_reference(
                ctx,
                &shape,
                &cfg,
                true,
                split,
                1000.0,
                50 + i as u64,
                (OFFSET_TOL, OFFSET_TOL),
            );
        }
    }
}

#[test]
fn off_centre_with_two_values_per_channel() {
    let ctx = gpu!();
    // Found by proptest on GL: M = 2 with 1000 + 0.1·randn, where the two values of a channel
    // can be closer than the rounding error of an f32 mean near 1000 (3e-5). Statistics are
    // therefore taken around a value of the channel itself, not around zero.
    let cfg = config(12, None, false, false, 1e-5);
    for seed in [7270471238052078841, 1, 2, 3] {
        check_against_reference(
            &ctx,
            &[2, 12],
            &cfg,
            false,
            ReduceSplit::Workgroup { chunk: 1024 },
            1000.0,
            seed,
            (OFFSET_TOL, OFFSET_TOL),
        );
        for split in [
            ReduceSplit::Workgroup { chunk: 256 },
            ReduceSplit::Invocation { chunk: 4 },
        ] {
            check_against_reference(&ctx, &[2, 12], &cfg, true, split, 1000.0, seed, (RTOL, RTOL));
        }
    }
}

#[test]
fn many_channels_fold_stats_and_finalize_dispatches() {
    // Its own context: on GL (llvmpipe) this submission runs for over 6 s (common::own_ctx).
    let Some(ctx) = common::own_ctx() else { return };
    // C = 70000 > 65535 workgroups in batch_norm_stats and batch_norm_finalize, with M = 2; and the same
    // channels one per invocation.
    let cfg = config(70_000, Some(0.1), true, true, 1e-5);
    for split in [
        ReduceSplit::Workgroup { chunk: 256 },
        ReduceSplit::Invocation { chunk: 4 },
    ] {
        check_against_reference(&ctx, &[2, 70_000], &cfg, true, split, 0.0, 21, (RTOL, ATOL));
    }
}

#[test]
fn one_channel_huge_m_folds_normalize_dispatch() {
    let ctx = gpu!();
    // C = 1, M = 2^24 + 12345: over 65535 normalize workgroups of 256, and 4099 stats chunks
    // merged by one finalize workgroup, or by one invocation.
    let cfg = config(1, None, true, true, 1e-5);
    for split in [
        ReduceSplit::Workgroup { chunk: 4096 },
        ReduceSplit::Invocation { chunk: 4096 },
    ] {
        check_against_reference(
            &ctx,
            &[1, 1, (1 << 24) + 12345],
            &cfg,
            true,
            split,
            0.0,
            31,
            (RTOL, ATOL),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Module behaviour

fn module_stats(ctx: &Context, bn: &BatchNorm) -> (Vec<f32>, Vec<f32>, Option<u64>) {
    (
        read(ctx, bn.running_mean().unwrap()),
        read(ctx, bn.running_var().unwrap()),
        bn.num_batches_tracked_blocking().unwrap(),
    )
}

#[test]
fn running_stats_recurrence_over_steps() {
    let ctx = gpu!();
    for momentum in [Some(0.1f32), Some(0.7), None, Some(0.0), Some(1.0)] {
        let cfg = config(6, momentum, true, true, 1e-5);
        let shape = [4, 6, 5, 3];
        let mut bn = BatchNorm::with_config(&ctx, cfg.clone()).unwrap();
        let mut run = RefRunningStats::new(6);
        let mut rng = Rng::new(99);
        for step in 0..5 {
            // Each step draws from a different distribution so the average actually moves.
            let x = rng.normal_vec(shape.iter().product(), step as f64, 1.0 + step as f64);
            let y = bn.forward(&Tensor::from_slice(&ctx, &x, &shape).unwrap()).unwrap();
            let r = batch_norm_forward(&x, &shape, &cfg, None, None, Some(&mut run), true).unwrap();
            let what = format!("momentum {momentum:?} step {step}");
            assert_close(&what, &read(&ctx, &y), &r.y, RTOL, ATOL);
            let (rm, rv, count) = module_stats(&ctx, &bn);
            assert_close(&format!("{what} running_mean"), &rm, &run.mean, RTOL, ATOL);
            assert_close(&format!("{what} running_var"), &rv, &run.var, RTOL, ATOL);
            assert_eq!(count, Some(step + 1), "{what}");
        }
    }
}

#[test]
fn eval_uses_running_stats_and_changes_nothing() {
    let ctx = gpu!();
    let cfg = BatchNormConfig::new(3);
    let shape = [4, 3, 6];
    let mut rng = Rng::new(5);
    let mut bn = BatchNorm::with_config(&ctx, cfg.clone()).unwrap();
    bn.set_weight(&[0.5, 1.5, -1.0]).unwrap();
    bn.set_bias(&[0.1, 0.2, 0.3]).unwrap();
    bn.forward(&Tensor::from_slice(&ctx, &rng.normal_vec(72, 2.0, 3.0), &shape).unwrap())
        .unwrap();
    let before = module_stats(&ctx, &bn);
    bn.eval();
    assert!(!bn.is_training());
    let x = rng.normal_vec(72, 0.0, 1.0);
    let y1 = read(
        &ctx,
        &bn.forward(&Tensor::from_slice(&ctx, &x, &shape).unwrap()).unwrap(),
    );
    let y2 = read(
        &ctx,
        &bn.forward(&Tensor::from_slice(&ctx, &x, &shape).unwrap()).unwrap(),
    );
    let after = module_stats(&ctx, &bn);
    assert_eq!(before, after, "eval changed the running statistics");
    assert_eq!(y1, y2);
    let mut run = RefRunningStats {
        mean: before.0.iter().map(|&v| v.into()).collect(),
        var: before.1.iter().map(|&v| v.into()).collect(),
        num_batches_tracked: 1,
    };
    let r = batch_norm_forward(
        &x,
        &shape,
        &cfg,
        Some(&[0.5, 1.5, -1.0]),
        Some(&[0.1, 0.2, 0.3]),
        Some(&mut run),
        false,
    )
    .unwrap();
    assert_close("eval y", &y1, &r.y, RTOL, ATOL);
    // Eval works with one value per channel (no batch statistics needed).
    bn.forward(&Tensor::from_slice(&ctx, &[1.0f32, 2.0, 3.0], &[1, 3]).unwrap())
        .unwrap();
    assert!(!bn.saved().unwrap().batch_stats);
}

#[test]
fn no_running_stats_uses_batch_stats_in_eval() {
    let ctx = gpu!();
    let cfg = config(2, Some(0.1), false, false, 1e-5);
    let mut bn = BatchNorm::with_config(&ctx, cfg.clone()).unwrap();
    bn.eval();
    assert!(bn.running_mean().is_none() && bn.num_batches_tracked_blocking().unwrap().is_none());
    let x = Rng::new(3).normal_vec(2 * 2 * 9, 1.0, 2.0);
    let y = read(
        &ctx,
        &bn.forward(&Tensor::from_slice(&ctx, &x, &[2, 2, 9]).unwrap()).unwrap(),
    );
    let r = batch_norm_forward(&x, &[2, 2, 9], &cfg, None, None, None, false).unwrap();
    assert_close("y", &y, &r.y, RTOL, ATOL);
    assert!(bn.saved().unwrap().batch_stats);
}

#[test]
fn state_round_trips_with_pytorch_keys() {
    let ctx = gpu!();
    let mut bn = BatchNorm::new(&ctx, 4).unwrap();
    bn.set_weight(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    bn.set_bias(&[-1.0, -2.0, -3.0, -4.0]).unwrap();
    bn.forward(&Tensor::from_slice(&ctx, &Rng::new(1).normal_vec(32, 0.0, 1.0), &[8, 4]).unwrap())
        .unwrap();
    bn.forward(&Tensor::from_slice(&ctx, &Rng::new(2).normal_vec(32, 0.0, 1.0), &[8, 4]).unwrap())
        .unwrap();
    let bytes = bn.state_to_safetensors("bn1.").unwrap();

    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<_> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "bn1.bias",
            "bn1.num_batches_tracked",
            "bn1.running_mean",
            "bn1.running_var",
            "bn1.weight"
        ]
    );
    let nbt = st.tensor("bn1.num_batches_tracked").unwrap();
    assert_eq!(nbt.dtype(), safetensors::Dtype::I64);
    assert!(
        nbt.shape().is_empty(),
        "PyTorch stores num_batches_tracked as a 0-d tensor"
    );

    let mut other = BatchNorm::new(&ctx, 4).unwrap();
    other.load_state_from_safetensors(&bytes, "bn1.").unwrap();
    assert_eq!(module_stats(&ctx, &bn), module_stats(&ctx, &other));
    assert_eq!(read(&ctx, bn.weight().unwrap()), read(&ctx, other.weight().unwrap()));
    assert_eq!(read(&ctx, bn.bias().unwrap()), read(&ctx, other.bias().unwrap()));
    assert_eq!(other.num_batches_tracked_blocking().unwrap(), Some(2));

    // Wrong channel count or a missing key: an error, and nothing changes.
    let mut five = BatchNorm::new(&ctx, 5).unwrap();
    let before = module_stats(&ctx, &five);
    assert!(matches!(
        five.load_state_from_safetensors(&bytes, "bn1."),
        Err(Error::SafeTensors(_))
    ));
    assert!(matches!(
        five.load_state_from_safetensors(&bytes, "bn2."),
        Err(Error::SafeTensors(_))
    ));
    assert_eq!(before, module_stats(&ctx, &five));
    assert_eq!(read(&ctx, five.weight().unwrap()), vec![1.0; 5]);

    let path = std::env::temp_dir().join(format!("normdrop-state-{}.safetensors", std::process::id()));
    bn.save_state(&path).unwrap();
    let mut from_file = BatchNorm::new(&ctx, 4).unwrap();
    from_file.load_state(&path).unwrap();
    assert_eq!(module_stats(&ctx, &bn), module_stats(&ctx, &from_file));
    std::fs::remove_file(path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Bad input: a typed error, and the running statistics and counter stay as they were.

#[test]
fn bad_input_is_rejected_and_changes_nothing() {
    let ctx = gpu!();
    let mut bn = BatchNorm::new(&ctx, 3).unwrap();
    bn.forward(&Tensor::from_slice(&ctx, &Rng::new(4).normal_vec(24, 1.0, 2.0), &[2, 3, 4]).unwrap())
        .unwrap();
    let before = module_stats(&ctx, &bn);
    let t = |shape: &[usize]| Tensor::zeros(&ctx, shape, DType::F32).unwrap();

    // Rank < 2.
    assert!(matches!(bn.forward(&t(&[3])), Err(Error::Shape { .. })));
    // Channel count different from num_features.
    assert!(matches!(bn.forward(&t(&[2, 4, 5])), Err(Error::Shape { .. })));
    // One value per channel in training.
    let e = bn.forward(&t(&[1, 3])).unwrap_err();
    assert!(
        matches!(e, Error::Shape { .. }) && e.to_string().contains("more than 1 value per channel"),
        "{e}"
    );
    let e = bn.forward(&t(&[1, 3, 1, 1])).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    // Empty tensors.
    assert!(matches!(bn.forward(&t(&[0, 3, 4])), Err(Error::Shape { .. })));
    assert!(matches!(bn.forward(&t(&[2, 3, 0])), Err(Error::Shape { .. })));
    // Parameter setters with the wrong length.
    assert!(matches!(bn.set_running_mean(&[0.0; 4]), Err(Error::Shape { .. })));

    assert_eq!(
        before,
        module_stats(&ctx, &bn),
        "a failed call changed the running statistics"
    );
}

#[test]
fn bad_hyper_parameters_are_rejected() {
    let ctx = gpu!();
    for eps in [0.0f32, -1e-5, f32::NAN, f32::INFINITY] {
        let r = BatchNorm::with_config(&ctx, config(3, Some(0.1), true, true, eps));
        assert!(matches!(r, Err(Error::InvalidArgument { .. })), "eps {eps}");
    }
    for m in [-0.1f32, 1.5, f32::NAN] {
        let r = BatchNorm::with_config(&ctx, config(3, Some(m), true, true, 1e-5));
        assert!(matches!(r, Err(Error::InvalidArgument { .. })), "momentum {m}");
    }
    assert!(matches!(BatchNorm::new(&ctx, 0), Err(Error::InvalidArgument { .. })));
    // Boundary values are legal.
    BatchNorm::with_config(&ctx, config(3, Some(0.0), true, true, 1e-12)).unwrap();
    BatchNorm::with_config(&ctx, config(3, Some(1.0), true, true, 1e-5)).unwrap();
}

#[test]
fn bad_reduce_splits_are_rejected_by_forward_backward_and_module() {
    let ctx = gpu!();
    let cfg = config(3, Some(0.1), true, true, 1e-5);
    let shape = [4, 3, 10];
    let fwd = ctx.kernel::<BatchNormKernel>().unwrap();
    let bwd = ctx.kernel::<BatchNormBackwardKernel>().unwrap();
    for split in [
        ReduceSplit::Workgroup { chunk: 0 },
        ReduceSplit::Workgroup { chunk: 100 },
        ReduceSplit::Workgroup { chunk: 260 },
        ReduceSplit::Invocation { chunk: 0 },
        ReduceSplit::Invocation { chunk: 6 },
    ] {
        let options = BatchNormPlanOptions {
            split: Some(split),
            ..Default::default()
        };
        let r = fwd.plan_with(ctx.device(), &shape, &cfg, &options);
        assert!(matches!(r, Err(Error::InvalidArgument { .. })), "forward {split:?}");
        let r = bwd.plan_with(ctx.device(), &shape, &cfg, None, Some(split));
        assert!(matches!(r, Err(Error::InvalidArgument { .. })), "backward {split:?}");
        let mut bn = BatchNorm::with_config(&ctx, cfg.clone()).unwrap();
        bn.set_reduce_split(Some(split));
        let x = Tensor::from_slice(&ctx, &[0.5f32; 120], &shape).unwrap();
        assert!(
            matches!(bn.forward(&x), Err(Error::InvalidArgument { .. })),
            "module {split:?}"
        );
        assert_eq!(bn.num_batches_tracked_blocking().unwrap(), Some(0), "{split:?}");
    }
    // Plans report the split they use; the smallest legal chunks are accepted.
    for split in [
        ReduceSplit::Workgroup { chunk: 256 },
        ReduceSplit::Invocation { chunk: 4 },
    ] {
        let options = BatchNormPlanOptions {
            split: Some(split),
            ..Default::default()
        };
        assert_eq!(
            fwd.plan_with(ctx.device(), &shape, &cfg, &options).unwrap().split(),
            split
        );
        assert_eq!(
            bwd.plan_with(ctx.device(), &shape, &cfg, None, Some(split))
                .unwrap()
                .split(),
            split
        );
    }
}

#[test]
fn bad_caller_buffers_are_rejected_before_encoding() {
    let ctx = gpu!();
    let shape = [2, 3, 5];
    let run = RefRunningStats::new(3);
    let bufs = Bufs::new(
        &ctx,
        &Rng::new(9).normal_vec(30, 0.0, 1.0),
        &shape,
        &[1.0; 3],
        &[0.0; 3],
        &run,
    );
    let kernel = ctx.kernel::<BatchNormKernel>().unwrap();
    let plan = kernel.plan(ctx.device(), &shape, &BatchNormConfig::new(3)).unwrap();
    let small = Tensor::zeros(&ctx, &[29], DType::F32).unwrap();
    let small_c = Tensor::zeros(&ctx, &[2], DType::F32).unwrap();
    let encode = |args: BatchNormBuffers<'_>| {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        let r = plan.encode(ctx.device(), &mut encoder, true, &args);
        // Nothing was recorded on error, so submitting the encoder is a no-op.
        ctx.queue().submit([encoder.finish()]);
        r
    };

    let too_small = |r: Result<(), Error>, what: &str| match r {
        Err(Error::BufferTooSmall { what: w, .. }) => assert_eq!(w, what),
        other => panic!("{what}: {other:?}"),
    };
    too_small(
        encode(BatchNormBuffers {
            x: small.slice(),
            ..bufs.args()
        }),
        "x",
    );
    too_small(
        encode(BatchNormBuffers {
            y: small.slice(),
            ..bufs.args()
        }),
        "y",
    );
    too_small(
        encode(BatchNormBuffers {
            weight: Some(small_c.slice()),
            ..bufs.args()
        }),
        "weight",
    );
    too_small(
        encode(BatchNormBuffers {
            running_var: Some(small_c.slice()),
            ..bufs.args()
        }),
        "running_var",
    );
    too_small(
        encode(BatchNormBuffers {
            save_invstd: small_c.slice(),
            ..bufs.args()
        }),
        "save_invstd",
    );
    too_small(
        encode(BatchNormBuffers {
            num_batches_tracked: Some(small_c.buffer().slice(..4)),
            ..bufs.args()
        }),
        "num_batches_tracked",
    );
    // A buffer slice at an unaligned offset.
    let big = Tensor::zeros(&ctx, &[64], DType::F32).unwrap();
    let r = encode(BatchNormBuffers {
        y: big.buffer().slice(4..),
        ..bufs.args()
    });
    assert!(matches!(r, Err(Error::Buffer { what: "y", .. })), "{r:?}");
    // Missing affine and tracking buffers.
    let r = encode(BatchNormBuffers {
        bias: None,
        ..bufs.args()
    });
    assert!(matches!(r, Err(Error::Buffer { what: "bias", .. })), "{r:?}");
    let r = encode(BatchNormBuffers {
        num_batches_tracked: None,
        ..bufs.args()
    });
    assert!(
        matches!(
            r,
            Err(Error::Buffer {
                what: "num_batches_tracked",
                ..
            })
        ),
        "{r:?}"
    );
    // In place, and an output sharing a buffer with a read-only parameter.
    let r = encode(BatchNormBuffers {
        y: bufs.x.slice(),
        ..bufs.args()
    });
    assert!(
        matches!(
            r,
            Err(Error::Aliased {
                what: "y",
                other: "x",
                ..
            })
        ),
        "{r:?}"
    );
    let r = encode(BatchNormBuffers {
        save_mean: bufs.weight.slice(),
        ..bufs.args()
    });
    assert!(
        matches!(
            r,
            Err(Error::Aliased {
                what: "save_mean",
                other: "weight",
                ..
            })
        ),
        "{r:?}"
    );

    // Nothing ran: the running statistics and the counter are as created.
    assert_eq!(read(&ctx, &bufs.running_mean), vec![0.0; 3]);
    assert_eq!(read(&ctx, &bufs.running_var), vec![1.0; 3]);
    assert_eq!(bufs.count(&ctx), 0);
}

#[test]
fn sample_beyond_binding_limit_is_refused_naming_the_limit() {
    // Larger tensors run in binding ranges of whole samples (tests/binding_ranges.rs); a single sample that
    // exceeds one binding cannot be split and is refused.
    let Some(shared) = common::ctx() else { return };
    // A device whose storage bindings stop at 64 KiB.
    let limits = wgpu::Limits {
        max_storage_buffer_binding_size: 64 << 10,
        ..shared.limits()
    };
    let ctx = Context::with_options_blocking(ContextOptions {
        limits: Some(limits),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(ctx.limits().max_storage_buffer_binding_size, 64 << 10);
    let mut bn = BatchNorm::new(&ctx, 2).unwrap();
    let before = module_stats(&ctx, &bn);
    let x = Tensor::zeros(&ctx, &[2, 2, 8193], DType::F32).unwrap(); // 131 KiB
    let e = bn.forward(&x).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ExceedsLimit {
                limit_name: "max_storage_buffer_binding_size",
                limit: 65536,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("max_storage_buffer_binding_size"), "{e}");
    assert_eq!(before, module_stats(&ctx, &bn));
    // Just under the limit works.
    bn.forward(&Tensor::zeros(&ctx, &[2, 2, 4096], DType::F32).unwrap())
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Embedding: the caller's device, encoder and buffers with offsets

#[test]
fn encodes_into_callers_encoder_with_offsets() {
    let Some(shared) = common::ctx() else { return };
    // Wrap the caller's device and queue.
    let ctx = Context::from_wgpu(shared.device().clone(), shared.queue().clone());
    let device = ctx.device();
    let align = u64::from(device.limits().min_storage_buffer_offset_alignment).max(256);
    let shape = [3, 2, 7];
    let x = Rng::new(17).normal_vec(42, 0.5, 2.0);
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let make = |size: u64| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage,
            mapped_at_creation: false,
        })
    };
    // x lives at an offset in the caller's input buffer, next to γ and β.
    let inputs = make(3 * align);
    ctx.queue().write_buffer(&inputs, align, bytemuck::cast_slice(&x));
    ctx.queue()
        .write_buffer(&inputs, 0, bytemuck::cast_slice(&[2.0f32, 0.5]));
    ctx.queue()
        .write_buffer(&inputs, 2 * align, bytemuck::cast_slice(&[1.0f32, -1.0]));
    // Every output shares one buffer at different offsets (all are written, so this is legal).
    let outputs = make(6 * align);
    ctx.queue()
        .write_buffer(&outputs, 2 * align, bytemuck::cast_slice(&[1.0f32, 1.0])); // running_var
    fn at(b: &wgpu::Buffer, align: u64, k: u64, len: u64) -> wgpu::BufferSlice<'_> {
        b.slice(k * align..k * align + len)
    }
    let args = BatchNormBuffers {
        x: at(&inputs, align, 1, 42 * 4),
        y: at(&outputs, align, 5, 42 * 4),
        weight: Some(at(&inputs, align, 0, 8)),
        bias: Some(at(&inputs, align, 2, 8)),
        running_mean: Some(at(&outputs, align, 1, 8)),
        running_var: Some(at(&outputs, align, 2, 8)),
        num_batches_tracked: Some(at(&outputs, align, 0, 8)),
        save_mean: at(&outputs, align, 3, 8),
        save_invstd: at(&outputs, align, 4, 8),
        rng: None,
    };
    let kernel = BatchNormKernel::new(device);
    let plan = kernel.plan(device, &shape, &BatchNormConfig::new(2)).unwrap();
    let mut encoder = device.create_command_encoder(&Default::default());
    // Two training steps in one encoder and one submission.
    plan.encode(device, &mut encoder, true, &args).unwrap();
    plan.encode(device, &mut encoder, true, &args).unwrap();
    ctx.queue().submit([encoder.finish()]);

    let cfg = BatchNormConfig::new(2);
    let mut run = RefRunningStats::new(2);
    batch_norm_forward(
        &x,
        &shape,
        &cfg,
        Some(&[2.0, 0.5]),
        Some(&[1.0, -1.0]),
        Some(&mut run),
        true,
    )
    .unwrap();
    let r = batch_norm_forward(
        &x,
        &shape,
        &cfg,
        Some(&[2.0, 0.5]),
        Some(&[1.0, -1.0]),
        Some(&mut run),
        true,
    )
    .unwrap();
    let f32s = |k: u64, n: usize| -> Vec<f32> {
        let b = pollster::block_on(ctx.read_buffer(&outputs, k * align, (n * 4) as u64)).unwrap();
        bytemuck::cast_slice(&b).to_vec()
    };
    assert_close("y", &f32s(5, 42), &r.y, RTOL, ATOL);
    assert_close("running_mean", &f32s(1, 2), &run.mean, RTOL, ATOL);
    assert_close("running_var", &f32s(2, 2), &run.var, RTOL, ATOL);
    assert_close("save_mean", &f32s(3, 2), &r.mean, RTOL, ATOL);
    let count = pollster::block_on(ctx.read_buffer(&outputs, 0, 8)).unwrap();
    assert_eq!(u64::from_le_bytes(count[..8].try_into().unwrap()), 2);
}

/// The one-pass-per-channel training forward (CPU adapters with SUBGROUP of 8 lanes or more;
/// `shaders/cpu/batch_norm/forward_channel.wgsl`) gives the reference's y, saved statistics, running
/// statistics and count, with dropout the CPU twin's mask (both scaling modes), with and
/// without γ/β and running statistics, in training and in eval without running statistics
/// (batch statistics, no count), for planes narrower and wider than the subgroup's 8 quads and
/// off-centre data. Where the device lacks it, forcing it is refused; everywhere the cumulative
/// average, S % 4 ≠ 0 and f16 are refused, and the default takes it exactly where it can.
#[test]
fn channel_pass_matches_the_reference_where_the_device_has_it() {
    let ctx = gpu!();
    let device = ctx.device();
    let info = device.adapter_info();
    let has = info.device_type == wgpu::DeviceType::Cpu
        && ctx.features().contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size >= 8
        && device.limits().max_storage_buffers_per_shader_stage >= 10;
    let kernel = ctx.kernel::<BatchNormKernel>().unwrap();
    let forced = BatchNormPlanOptions {
        channel_pass: Some(true),
        ..Default::default()
    };
    let momentum = config(16, Some(0.1), true, true, 1e-5);
    // Refused everywhere: the cumulative average (momentum None), S off the quads.
    for (shape, cfg) in [
        (vec![2, 16, 8], config(16, None, true, true, 1e-5)),
        (vec![2, 16, 7], momentum.clone()),
    ] {
        let e = kernel.plan_with(device, &shape, &cfg, &forced).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{shape:?}: {e}");
        let plan = kernel.plan_with(device, &shape, &cfg, &Default::default()).unwrap();
        assert!(!plan.channel_pass(), "{shape:?}");
    }
    let f16 = BatchNormKernel::with_storage(device, normdrop::Storage::F16Packed).unwrap();
    let e = f16.plan_with(device, &[2, 16, 8], &momentum, &forced).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    if !has {
        let e = kernel.plan_with(device, &[2, 16, 8], &momentum, &forced).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        return;
    }
    // The default takes it with enough channels, no split override, and not otherwise.
    let momentum = config(64, Some(0.1), true, true, 1e-5);
    assert!(kernel
        .plan_with(device, &[2, 64, 8], &momentum, &Default::default())
        .unwrap()
        .channel_pass());
    let split = BatchNormPlanOptions {
        split: Some(ReduceSplit::Invocation { chunk: 64 }),
        ..Default::default()
    };
    assert!(!kernel
        .plan_with(device, &[2, 64, 8], &momentum, &split)
        .unwrap()
        .channel_pass());
    let never = BatchNormPlanOptions {
        channel_pass: Some(false),
        ..Default::default()
    };
    assert!(!kernel
        .plan_with(device, &[2, 64, 8], &momentum, &never)
        .unwrap()
        .channel_pass());
    let drops = dropout_choices();
    for shape in CHANNEL_SHAPES {
        let c = shape[1];
        for (affine, track) in [(true, true), (false, true), (true, false)] {
            let cfg = config(c, Some(0.1), affine, track, 1e-5);
            for (i, dropout) in drops.iter().enumerate() {
                let options = BatchNormPlanOptions {
                    dropout: *dropout,
                    ..forced
                };
                for training in [true, false] {
                    let seed = 90 + i as u64;
                    check_with_options(&ctx, shape, &cfg, training, &options, 0.0, seed, (RTOL, ATOL));
                }
            }
        }
    }
    // Off-centre channels keep their spread (statistics around x[0, c, 0]).
    let cfg = config(4, Some(0.1), true, true, 1e-5);
    check_with_options(
        &ctx,
        &[3, 4, 64],
        &cfg,
        true,
        &forced,
        1000.0,
        97,
        (OFFSET_TOL, OFFSET_TOL),
    );
}

/// The backward with batch statistics in one pass per channel (CPU adapters with SUBGROUP of 8
/// lanes or more; `shaders/cpu/batch_norm/backward_channel.wgsl`) gives the reference's dx, dγ and
/// dβ, writing and then accumulating (every gradient twice the reference's), with and without
/// γ/β; with a fused dropout (both scaling modes; writing parks dy·m in dx, accumulating draws
/// the mask again) the same gradients as the three-pass backward, whose mask handling the
/// fused-versus-unfused tests pin. Forcing it is refused where the device lacks it and for S off
/// the quads; the default takes it with enough channels and no split override.
#[test]
fn channel_backward_matches_the_reference_where_the_device_has_it() {
    let ctx = gpu!();
    let device = ctx.device();
    let info = device.adapter_info();
    let has = info.device_type == wgpu::DeviceType::Cpu
        && ctx.features().contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size >= 8;
    let kernel = ctx.kernel::<BatchNormBackwardKernel>().unwrap();
    let options = |channel_pass| BatchNormBackwardPlanOptions {
        channel_pass: Some(channel_pass),
        ..Default::default()
    };
    let cfg64 = config(64, Some(0.1), true, true, 1e-5);
    let e = kernel
        .plan_with_options(device, &[2, 64, 7], &cfg64, None, &options(true))
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    if !has {
        let e = kernel
            .plan_with_options(device, &[2, 64, 8], &cfg64, None, &options(true))
            .unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        return;
    }
    assert!(kernel.plan(device, &[2, 64, 8], &cfg64, None).unwrap().channel_pass());
    let split = Some(ReduceSplit::Invocation { chunk: 64 });
    assert!(!kernel
        .plan_with(device, &[2, 64, 8], &cfg64, None, split)
        .unwrap()
        .channel_pass());
    assert!(!kernel
        .plan_with_options(device, &[2, 64, 8], &cfg64, None, &options(false))
        .unwrap()
        .channel_pass());

    let drops = dropout_choices();
    let mut rng = Rng::new(77);
    for shape in CHANNEL_SHAPES {
        let (c, numel) = (shape[1], shape.iter().product::<usize>());
        for affine in [true, false] {
            let cfg = config(c, Some(0.1), affine, true, 1e-5);
            let x = rng.normal_vec(numel, 3.0, 2.0);
            let dy = rng.normal_vec(numel, 0.0, 1.0);
            let weight = rng.normal_vec(c, 1.0, 0.5);
            let mut run = RefRunningStats::new(c);
            let fwd = batch_norm_forward(&x, shape, &cfg, Some(&weight), None, Some(&mut run), true).unwrap();
            let up = |v: &[f32], s: &[usize]| Tensor::from_slice(&ctx, v, s).unwrap();
            let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
            let (xt, dyt, wt) = (up(&x, shape), up(&dy, shape), up(&weight, &[c]));
            let (mean, invstd) = (up(&f32s(&fwd.mean), &[c]), up(&f32s(&fwd.invstd), &[c]));
            for (i, dropout) in drops.iter().enumerate() {
                let state = ctx.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: &rng_state_bytes(100 + i as u64, DROP_OFFSET),
                    usage: wgpu::BufferUsages::STORAGE,
                });
                // Each path writes its gradients, then adds to them once more.
                let grads = |channel: bool| -> [Vec<f32>; 3] {
                    let plan = kernel
                        .plan_with_options(device, shape, &cfg, dropout.map(|d| (d, true)), &options(channel))
                        .unwrap();
                    assert_eq!(plan.channel_pass(), channel);
                    let zeros = |s: &[usize]| Tensor::zeros(&ctx, s, DType::F32).unwrap();
                    let (dx, dw, db) = (zeros(shape), zeros(&[c]), zeros(&[c]));
                    let b = BatchNormBackwardBuffers {
                        x: xt.slice(),
                        dy: dyt.slice(),
                        dx: dx.slice(),
                        weight: affine.then(|| wt.slice()),
                        save_mean: mean.slice(),
                        save_invstd: invstd.slice(),
                        dweight: affine.then(|| dw.slice()),
                        dbias: affine.then(|| db.slice()),
                        rng: dropout.map(|_| state.slice(..)),
                    };
                    let mut encoder = device.create_command_encoder(&Default::default());
                    plan.encode(device, &mut encoder, true, Accumulate::default(), &b)
                        .unwrap();
                    let both = Accumulate { dx: true, params: true };
                    plan.encode(device, &mut encoder, true, both, &b).unwrap();
                    ctx.queue().submit([encoder.finish()]);
                    [read(&ctx, &dx), read(&ctx, &dw), read(&ctx, &db)]
                };
                let what = format!("{shape:?} affine {affine} {dropout:?}");
                let [dx, dw, db] = grads(true);
                if dropout.is_none() {
                    let w64 = widen(&weight);
                    let r = batch_norm_backward(
                        &widen(&x),
                        &widen(&dy),
                        shape,
                        &cfg,
                        Some(&w64),
                        &fwd.mean,
                        &fwd.invstd,
                        true,
                    )
                    .unwrap();
                    let twice = |v: &[f64]| v.iter().map(|g| 2.0 * g).collect::<Vec<_>>();
                    assert_close(&format!("{what} 2·dx"), &dx, &twice(&r.dx), RTOL, 2.0 * ATOL);
                    if affine {
                        assert_close(&format!("{what} 2·dγ"), &dw, &twice(&r.dweight), RTOL, 1e-4);
                        assert_close(&format!("{what} 2·dβ"), &db, &twice(&r.dbias), RTOL, 1e-4);
                    }
                }
                let [ex, ew, eb] = grads(false);
                assert_close(
                    &format!("{what} dx vs three passes"),
                    &dx,
                    &widen(&ex),
                    RTOL,
                    2.0 * ATOL,
                );
                assert_close(&format!("{what} dγ vs three passes"), &dw, &widen(&ew), RTOL, 1e-4);
                assert_close(&format!("{what} dβ vs three passes"), &db, &widen(&eb), RTOL, 1e-4);
            }
        }
    }
}
