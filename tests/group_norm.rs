//! GroupNorm's GPU kernels (BatchNorm's split reduction on group views, GroupNorm's finalize
//! passes) against the f64 CPU reference: forward y, mean, rstd and backward dx, dγ, dβ, over
//! the awkward shapes (G = 1, G = C, N = 1, (N, C) without spatial dims, 3-D spatial, primes,
//! one group of hundreds of thousands of elements), both reduce splits with small chunks, f16
//! on both storage paths, tensors split over 64 KiB bindings, accumulation, the modules
//! (GroupNorm, InstanceNorm) and bad input.

mod common;

use common::Rng;
use normdrop::reference::{group_norm_backward, group_norm_forward};
use normdrop::tuning::ReduceSplit;
use normdrop::{
    Accumulate, Context, ContextOptions, DType, Error, GradTargets, GroupNorm, GroupNormBackwardBuffers,
    GroupNormBackwardKernel, GroupNormBuffers, GroupNormConfig, GroupNormKernel, GroupNormPlanOptions, InstanceNorm,
    Tensor,
};
use normdrop_cli::fixture::compare;
use proptest::prelude::*;

/// GPU results of one forward + backward, widened to f64.
struct Out {
    y: Vec<f64>,
    mean: Vec<f64>,
    rstd: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

/// Runs forward and backward through the low-level plans in one encoder. `accumulate` adds
/// into dx = 1, dγ = 2, dβ = 3 (checked by the caller).
#[allow(clippy::too_many_arguments)]
fn run(
    ctx: &Context,
    x: &[f32],
    dy: &[f32],
    params: Option<(&[f32], &[f32])>,
    shape: &[usize],
    config: &GroupNormConfig,
    dtype: DType,
    options: &GroupNormPlanOptions,
    accumulate: Accumulate,
) -> Result<Out, Error> {
    let c = config.num_channels;
    let groups = [shape[0], config.num_groups];
    let xt = Tensor::from_f32(ctx, x, shape, dtype)?;
    let dyt = Tensor::from_f32(ctx, dy, shape, dtype)?;
    let y = Tensor::zeros(ctx, shape, dtype)?;
    let dx = Tensor::full(ctx, shape, 1.0, dtype)?;
    let mean = Tensor::zeros(ctx, &groups, DType::F32)?;
    let rstd = Tensor::zeros(ctx, &groups, DType::F32)?;
    let w = params.map(|(w, _)| Tensor::from_slice(ctx, w, &[c])).transpose()?;
    let b = params.map(|(_, b)| Tensor::from_slice(ctx, b, &[c])).transpose()?;
    let dw = Tensor::full(ctx, &[c], 2.0, DType::F32)?;
    let db = Tensor::full(ctx, &[c], 3.0, DType::F32)?;
    let fwd = ctx
        .kernel_for::<GroupNormKernel>(dtype)?
        .plan_with(ctx.device(), shape, config, options)?;
    let bwd = ctx
        .kernel_for::<GroupNormBackwardKernel>(dtype)?
        .plan_with(ctx.device(), shape, config, options)?;
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    fwd.encode(
        ctx.device(),
        &mut encoder,
        &GroupNormBuffers {
            x: xt.slice(),
            y: y.slice(),
            weight: w.as_ref().map(Tensor::slice),
            bias: b.as_ref().map(Tensor::slice),
            mean: mean.slice(),
            rstd: rstd.slice(),
        },
    )?;
    bwd.encode(
        ctx.device(),
        &mut encoder,
        &GroupNormBackwardBuffers {
            x: xt.slice(),
            dy: dyt.slice(),
            dx: dx.slice(),
            weight: w.as_ref().map(Tensor::slice),
            mean: mean.slice(),
            rstd: rstd.slice(),
            dweight: config.affine.then(|| dw.slice()),
            dbias: config.affine.then(|| db.slice()),
        },
        accumulate,
    )?;
    ctx.submit(encoder)?;
    Ok(Out {
        y: y.to_f64_blocking(ctx)?,
        mean: mean.to_f64_blocking(ctx)?,
        rstd: rstd.to_f64_blocking(ctx)?,
        dx: dx.to_f64_blocking(ctx)?,
        dw: dw.to_f64_blocking(ctx)?,
        db: db.to_f64_blocking(ctx)?,
    })
}

/// One case against the reference: data around `centre` (off-centre data checks that the
/// statistics are taken around a value of the data), f16 inputs rounded first and held to the
/// float16 fixtures' tolerance.
#[allow(clippy::too_many_arguments)]
fn check(
    ctx: &Context,
    shape: &[usize],
    groups: usize,
    dtype: DType,
    affine: bool,
    options: &GroupNormPlanOptions,
    accumulate: Accumulate,
    centre: f64,
    seed: u64,
) {
    let n: usize = shape.iter().product();
    let c = shape[1];
    let mut rng = Rng::new(seed);
    let round = |v: Vec<f32>| -> Vec<f32> {
        match dtype {
            DType::F32 => v,
            DType::F16 => v.into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect(),
        }
    };
    let x = round(rng.normal_vec(n, centre, 1.5));
    let dy = round(rng.normal_vec(n, 0.0, 1.0));
    let weight = rng.normal_vec(c, 1.0, 0.5);
    let bias = rng.normal_vec(c, 0.0, 0.5);
    let config = GroupNormConfig {
        affine,
        ..GroupNormConfig::new(groups, c)
    };
    let params = affine.then_some((&weight[..], &bias[..]));
    let got = run(ctx, &x, &dy, params, shape, &config, dtype, options, accumulate)
        .unwrap_or_else(|e| panic!("{shape:?} G={groups} {dtype} {options:?}: {e}"));
    let wide = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
    let (wf, bf) = (wide(&weight), wide(&bias));
    let f = group_norm_forward(&wide(&x), shape, &config, Some(&wf), Some(&bf)).unwrap();
    let g = group_norm_backward(&wide(&x), &wide(&dy), shape, &config, Some(&wf), &f.mean, &f.rstd).unwrap();
    let plus = |v: &[f64], k: f64| v.iter().map(|a| a + k).collect::<Vec<_>>();
    let dx_exp = if accumulate.dx { plus(&g.dx, 1.0) } else { g.dx.clone() };
    let (dw_exp, db_exp) = if accumulate.params {
        (plus(&g.dweight, 2.0), plus(&g.dbias, 3.0))
    } else {
        (g.dweight.clone(), g.dbias.clone())
    };
    let tol = match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
    };
    let mut pairs = vec![
        ("y", &got.y, &f.y),
        ("mean", &got.mean, &f.mean),
        ("rstd", &got.rstd, &f.rstd),
        ("dx", &got.dx, &dx_exp),
    ];
    if affine {
        pairs.push(("dweight", &got.dw, &dw_exp));
        pairs.push(("dbias", &got.db, &db_exp));
    } else {
        // Without affine the gradient targets are not bound: untouched.
        assert!(got.dw.iter().all(|&v| v == 2.0) && got.db.iter().all(|&v| v == 3.0));
    }
    for (what, got, exp) in pairs {
        let c = compare(got, exp, tol, tol);
        assert!(
            c.passed,
            "{shape:?} G={groups} {dtype} {options:?} {what}: max_abs_err {:.3e}, {:.2}x the tolerance",
            c.max_abs_err, c.worst_ratio
        );
    }
}

fn splits() -> Vec<GroupNormPlanOptions> {
    let mut out = vec![GroupNormPlanOptions::default()];
    for (split, run) in [
        (ReduceSplit::Workgroup { chunk: 256 }, 1),
        (ReduceSplit::Workgroup { chunk: 4096 }, 8),
        (ReduceSplit::Invocation { chunk: 4 }, 1),
        (ReduceSplit::Invocation { chunk: 68 }, 3),
    ] {
        out.push(GroupNormPlanOptions {
            split: Some(split),
            run: Some(run),
        });
    }
    out
}

/// (shape, G): the awkward ones of the issue and sizes off every multiple of 4.
const SHAPES: &[(&[usize], usize)] = &[
    (&[2, 6, 5, 7], 3),
    (&[4, 32, 8, 8], 32),   // G = C: InstanceNorm
    (&[3, 12, 16], 1),      // G = 1
    (&[1, 8, 33], 4),       // N = 1, odd spatial
    (&[5, 10], 5),          // (N, C): no spatial dims, 2 elements per group
    (&[2, 4, 3, 5, 7], 2),  // 3-D spatial
    (&[3, 7, 13], 7),       // primes
    (&[2, 64, 1, 1], 16),   // 1 × 1 spatial
    (&[1, 3, 300, 301], 1), // one group of 270 900 elements
];

#[test]
fn group_norm_matches_the_reference_on_every_split() {
    let ctx = gpu!();
    for options in splits() {
        for (i, (shape, g)) in SHAPES.iter().enumerate() {
            check(
                &ctx,
                shape,
                *g,
                DType::F32,
                i % 3 != 2,
                &options,
                Accumulate::default(),
                0.3,
                10 + i as u64,
            );
        }
    }
}

#[test]
fn group_norm_keeps_the_precision_of_off_centre_data() {
    let ctx = gpu!();
    for (i, (shape, g)) in SHAPES.iter().enumerate().take(6) {
        check(
            &ctx,
            shape,
            *g,
            DType::F32,
            true,
            &GroupNormPlanOptions::default(),
            Accumulate::default(),
            1000.0,
            30 + i as u64,
        );
    }
}

#[test]
fn group_norm_accumulates_into_the_targets() {
    let ctx = gpu!();
    for (dx, params) in [(true, false), (false, true), (true, true)] {
        for options in [splits()[0], splits()[2]] {
            check(
                &ctx,
                &[3, 8, 12],
                4,
                DType::F32,
                true,
                &options,
                Accumulate { dx, params },
                0.0,
                50,
            );
        }
    }
}

#[test]
fn group_norm_f16_on_both_storage_paths() {
    let ctx = gpu!();
    let packed = Context::with_options_blocking(ContextOptions {
        force_packed_f16: true,
        ..Default::default()
    })
    .unwrap();
    for c in [&ctx, &packed] {
        for options in [splits()[0], splits()[3]] {
            for (i, (shape, g)) in SHAPES.iter().enumerate().take(8) {
                check(
                    c,
                    shape,
                    *g,
                    DType::F16,
                    true,
                    &options,
                    Accumulate::default(),
                    0.3,
                    60 + i as u64,
                );
            }
        }
    }
}

#[test]
fn group_norm_splits_past_the_binding_limit() {
    let ctx = gpu!();
    let small = Context::with_options_blocking(ContextOptions {
        limits: Some(normdrop::wgpu::Limits {
            max_storage_buffer_binding_size: 64 << 10,
            ..ctx.limits()
        }),
        ..Default::default()
    })
    .unwrap();
    let plan = small
        .kernel::<GroupNormKernel>()
        .unwrap()
        .plan(small.device(), &[6, 32, 20, 21], &GroupNormConfig::new(8, 32))
        .unwrap();
    assert!(plan.ranges() > 1, "the input should need several bindings");
    for options in [splits()[0], splits()[1], splits()[4]] {
        for dtype in [DType::F32, DType::F16] {
            let accumulate = Accumulate { dx: true, params: true };
            check(&small, &[6, 32, 20, 21], 8, dtype, true, &options, accumulate, 0.3, 70);
            check(&small, &[8, 6, 1001], 3, dtype, true, &options, accumulate, 0.3, 71);
        }
    }
    // A group larger than one binding is refused, naming the limit.
    let e = small
        .kernel::<GroupNormKernel>()
        .unwrap()
        .plan(small.device(), &[2, 4, 128, 128], &GroupNormConfig::new(1, 4))
        .unwrap_err();
    assert!(matches!(e, Error::ExceedsLimit { op: "group_norm", .. }), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn group_norm_matches_the_reference_on_random_shapes(
        n in 1usize..5,
        groups in 1usize..6,
        per_group in 1usize..5,
        spatial in proptest::collection::vec(1usize..12, 0..3),
        affine in any::<bool>(),
        split in common::reduce_splits(),
        seed in any::<u64>(),
    ) {
        let Some(ctx) = common::ctx() else { return Ok(()) };
        let mut shape = vec![n, groups * per_group];
        shape.extend(&spatial);
        // (N, C) with one channel per group has one element per group: variance 0, still
        // defined (y = β, dx = 0).
        let options = GroupNormPlanOptions { split: Some(split), run: None };
        check(&ctx, &shape, groups, DType::F32, affine, &options, Accumulate::default(), 0.5, seed);
    }
}

#[test]
fn group_norm_and_instance_norm_modules_match_the_reference() {
    let ctx = gpu!();
    let shape = [3, 6, 5, 4];
    let mut rng = Rng::new(80);
    let x = rng.normal_vec(360, 0.2, 1.0);
    let dy = rng.normal_vec(360, 0.0, 1.0);
    let wide = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
    let xt = Tensor::from_slice(&ctx, &x, &shape).unwrap();
    let dyt = Tensor::from_slice(&ctx, &dy, &shape).unwrap();
    let w = rng.normal_vec(6, 1.0, 0.3);
    let b = rng.normal_vec(6, 0.0, 0.3);

    let mut gn = GroupNorm::new(&ctx, 2, 6).unwrap();
    gn.set_weight(&w).unwrap();
    gn.set_bias(&b).unwrap();
    let y = gn.forward(&xt).unwrap();
    let grads = gn.backward(&dyt).unwrap();
    let config = GroupNormConfig::new(2, 6);
    let f = group_norm_forward(&wide(&x), &shape, &config, Some(&wide(&w)), Some(&wide(&b))).unwrap();
    let g = group_norm_backward(
        &wide(&x),
        &wide(&dy),
        &shape,
        &config,
        Some(&wide(&w)),
        &f.mean,
        &f.rstd,
    )
    .unwrap();
    let saved = gn.saved().unwrap();
    for (what, got, exp) in [
        ("y", y.to_f64_blocking(&ctx).unwrap(), &f.y),
        ("mean", saved.mean.to_f64_blocking(&ctx).unwrap(), &f.mean),
        ("dx", grads.dx.to_f64_blocking(&ctx).unwrap(), &g.dx),
        (
            "dweight",
            grads.dweight.unwrap().to_f64_blocking(&ctx).unwrap(),
            &g.dweight,
        ),
        ("dbias", grads.dbias.unwrap().to_f64_blocking(&ctx).unwrap(), &g.dbias),
    ] {
        assert!(compare(&got, exp, 1e-4, 1e-4).passed, "GroupNorm {what}");
    }
    // State round trip.
    let bytes = gn.state_to_safetensors("gn.").unwrap();
    let mut other = GroupNorm::new(&ctx, 2, 6).unwrap();
    other.load_state_from_safetensors(&bytes, "gn.").unwrap();
    assert_eq!(other.weight().unwrap().to_vec_blocking::<f32>(&ctx).unwrap(), w);
    assert_eq!(other.bias().unwrap().to_vec_blocking::<f32>(&ctx).unwrap(), b);

    // InstanceNorm: G = C, no affine parameters by default.
    let mut inorm = InstanceNorm::new(&ctx, 6).unwrap();
    assert!(inorm.weight().is_none());
    let y = inorm.forward(&xt).unwrap();
    let config = GroupNormConfig::instance_norm(6);
    let f = group_norm_forward(&wide(&x), &shape, &config, None, None).unwrap();
    let g = group_norm_backward(&wide(&x), &wide(&dy), &shape, &config, None, &f.mean, &f.rstd).unwrap();
    assert!(compare(&y.to_f64_blocking(&ctx).unwrap(), &f.y, 1e-4, 1e-4).passed);
    let grads = inorm.backward(&dyt).unwrap();
    assert!(grads.dweight.is_none() && grads.dbias.is_none());
    assert!(compare(&grads.dx.to_f64_blocking(&ctx).unwrap(), &g.dx, 1e-4, 1e-4).passed);
    // Each (sample, channel) of InstanceNorm's output has mean 0 and variance var/(var + eps).
    let yv = y.to_vec_blocking::<f32>(&ctx).unwrap();
    for plane in yv.chunks(20) {
        let m = plane.iter().map(|&v| f64::from(v)).sum::<f64>() / 20.0;
        assert!(m.abs() < 1e-5, "plane mean {m}");
    }
    // Accumulating backward into caller targets.
    let dx = Tensor::full(&ctx, &shape, 1.0, DType::F32).unwrap();
    inorm
        .backward_into(
            &dyt,
            GradTargets {
                dx: &dx,
                dweight: None,
                dbias: None,
            },
            Accumulate {
                dx: true,
                params: false,
            },
        )
        .unwrap();
    let plus: Vec<f64> = g.dx.iter().map(|v| v + 1.0).collect();
    assert!(compare(&dx.to_f64_blocking(&ctx).unwrap(), &plus, 1e-4, 1e-4).passed);
    let mut affine = InstanceNorm::with_options(&ctx, 6, 1e-3, true).unwrap();
    assert_eq!(affine.config().num_groups, 6);
    assert!(affine.forward(&xt).is_ok());
}

#[test]
fn group_norm_refuses_bad_input_and_changes_nothing() {
    let ctx = gpu!();
    let kernel = ctx.kernel::<GroupNormKernel>().unwrap();
    let config = GroupNormConfig::new(2, 6);
    for (shape, why) in [
        (&[3, 5, 4][..], "C mismatch"),
        (&[3][..], "rank 1"),
        (&[0, 6, 4][..], "empty"),
        (&[1 << 20, 6, 1 << 20][..], "too many elements"),
    ] {
        assert!(kernel.plan(ctx.device(), shape, &config).is_err(), "{why}");
    }
    assert!(
        matches!(
            kernel.plan(ctx.device(), &[3, 6, 4], &GroupNormConfig::new(4, 6)),
            Err(Error::InvalidArgument { op: "group_norm", .. })
        ),
        "C % G != 0"
    );
    let mut bad_eps = config.clone();
    bad_eps.eps = f32::NAN;
    assert!(kernel.plan(ctx.device(), &[3, 6, 4], &bad_eps).is_err());
    let bad_split = GroupNormPlanOptions {
        split: Some(ReduceSplit::Workgroup { chunk: 100 }),
        run: None,
    };
    assert!(kernel.plan_with(ctx.device(), &[3, 6, 4], &config, &bad_split).is_err());
    let bad_run = GroupNormPlanOptions {
        split: None,
        run: Some(0),
    };
    assert!(kernel.plan_with(ctx.device(), &[3, 6, 4], &config, &bad_run).is_err());

    let plan = kernel.plan(ctx.device(), &[3, 6, 4], &config).unwrap();
    let t = |shape: &[usize]| Tensor::zeros(&ctx, shape, DType::F32).unwrap();
    let (x, y, w, b, mean, rstd) = (t(&[3, 6, 4]), t(&[3, 6, 4]), t(&[6]), t(&[6]), t(&[3, 2]), t(&[3, 2]));
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    fn buffers<'a>(
        x: &'a Tensor,
        y: &'a Tensor,
        b: &'a Tensor,
        mean: &'a Tensor,
        rstd: &'a Tensor,
        weight: Option<&'a Tensor>,
    ) -> GroupNormBuffers<'a> {
        GroupNormBuffers {
            x: x.slice(),
            y: y.slice(),
            weight: weight.map(Tensor::slice),
            bias: Some(b.slice()),
            mean: mean.slice(),
            rstd: rstd.slice(),
        }
    }
    let e = plan
        .encode(ctx.device(), &mut encoder, &buffers(&x, &x, &b, &mean, &rstd, Some(&w)))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aliased {
                what: "y",
                other: "x",
                ..
            }
        ),
        "{e}"
    );
    let e = plan
        .encode(ctx.device(), &mut encoder, &buffers(&x, &y, &b, &rstd, &rstd, Some(&w)))
        .unwrap_err();
    assert!(matches!(e, Error::Aliased { .. }), "{e}");
    let e = plan
        .encode(ctx.device(), &mut encoder, &buffers(&x, &y, &b, &mean, &rstd, None))
        .unwrap_err();
    assert!(matches!(e, Error::Buffer { what: "weight", .. }), "{e}");
    let short = t(&[2]);
    let e = plan
        .encode(
            ctx.device(),
            &mut encoder,
            &buffers(&x, &y, &b, &short, &rstd, Some(&w)),
        )
        .unwrap_err();
    assert!(matches!(e, Error::BufferTooSmall { what: "mean", .. }), "{e}");

    // The module: a failed call leaves its saved statistics and plans as they were.
    let mut gn = GroupNorm::new(&ctx, 2, 6).unwrap();
    let xt = Tensor::from_slice(&ctx, &vec![1.0; 72], &[3, 6, 4]).unwrap();
    assert!(
        matches!(gn.backward(&xt), Err(Error::State { .. })),
        "backward before forward"
    );
    gn.forward(&xt).unwrap();
    let before = gn.saved().unwrap().mean.clone();
    assert!(gn.forward(&t(&[3, 5, 4])).is_err());
    assert!(gn.backward(&t(&[3, 6, 5])).is_err());
    assert!(gn.set_weight(&[1.0; 5]).is_err());
    assert!(
        gn.backward_into(
            &xt,
            GradTargets {
                dx: &t(&[3, 6, 4]),
                dweight: None,
                dbias: None,
            },
            Accumulate::default(),
        )
        .is_err(),
        "affine needs dweight and dbias"
    );
    assert!(gn.saved().unwrap().mean.slice().buffer() == before.slice().buffer());
    let other = Context::new_blocking().unwrap();
    let foreign = Tensor::zeros(&other, &[3, 6, 4], DType::F32).unwrap();
    assert!(matches!(gn.forward(&foreign), Err(Error::WrongDevice { .. })));
    let mut inorm = InstanceNorm::new(&ctx, 6).unwrap();
    assert!(inorm.set_weight(&[1.0; 6]).is_err(), "no affine");
    assert!(GroupNorm::new(&ctx, 4, 6).is_err());
}

/// CPU drivers (llvmpipe, lavapipe) stop a shader's loops after 65535 iterations: a one-
/// invocation finalize over 100 000 partials kept the first 65 535 (BatchNorm's invstd came out
/// 0.824 instead of 0.666). Plans now finalize with a workgroup past `SERIAL_LOOP_MAX`
/// iterations and refuse an Invocation chunk one invocation could not loop over.
#[test]
fn serial_reductions_stay_within_the_cpu_drivers_loop_limit() {
    let ctx = gpu!();
    let m = 400_000;
    let x = Rng::new(3).normal_vec(m, 0.3, 1.5);
    let xf: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let mean = xf.iter().sum::<f64>() / m as f64;
    let var = xf.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / m as f64;
    let xt = Tensor::from_slice(&ctx, &x, &[1, 1, m]).unwrap();
    let mut bn = normdrop::BatchNorm::new(&ctx, 1).unwrap();
    bn.set_reduce_split(Some(ReduceSplit::Invocation { chunk: 4 }));
    bn.forward(&xt).unwrap();
    let invstd = bn.saved().unwrap().invstd.to_vec_blocking::<f32>(&ctx).unwrap()[0];
    let exp = 1.0 / (var + 1e-5).sqrt();
    assert!(
        (f64::from(invstd) - exp).abs() < 1e-5 * exp,
        "BatchNorm invstd {invstd}, expected {exp}"
    );
    // GroupNorm, one group of 400 000 in 100 000 partials, forward and backward.
    let options = GroupNormPlanOptions {
        split: Some(ReduceSplit::Invocation { chunk: 4 }),
        run: None,
    };
    check(
        &ctx,
        &[1, 4, 100_000],
        1,
        DType::F32,
        true,
        &options,
        Accumulate::default(),
        0.3,
        90,
    );
    let too_long = GroupNormPlanOptions {
        split: Some(ReduceSplit::Invocation { chunk: 1 << 17 }),
        run: None,
    };
    let e = ctx
        .kernel::<GroupNormKernel>()
        .unwrap()
        .plan_with(ctx.device(), &[1, 4, 100_000], &GroupNormConfig::new(1, 4), &too_long)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
}
