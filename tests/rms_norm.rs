//! RMSNorm's GPU kernels (LayerNorm's passes with `RMS` set) against the f64 CPU reference:
//! forward y and rstd, backward dx and dγ, over awkward shapes (width 1, primes, widths off 4,
//! past the register paths, many rows), every geometry (lanes 1 to 256), f32 and f16 (native and
//! packed), tensors split over 64 KiB bindings, and the PyTorch fixtures; plus bad input.

mod common;

use common::Rng;
use normdrop::reference::{rms_norm_backward, rms_norm_forward};
use normdrop::tuning::LayerNormPlanOptions;
use normdrop::{
    Accumulate, Context, ContextOptions, DType, Error, RmsNormBackwardBuffers, RmsNormBackwardKernel, RmsNormBuffers,
    RmsNormConfig, RmsNormKernel, Tensor,
};
use normdrop_cli::fixture::compare;

/// Runs forward and backward on `ctx` and returns (y, rstd, dx, dγ) widened to f64.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn run(
    ctx: &Context,
    x: &[f32],
    dy: &[f32],
    weight: Option<&[f32]>,
    shape: &[usize],
    config: &RmsNormConfig,
    dtype: DType,
    options: &LayerNormPlanOptions,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>), Error> {
    let (rows, width) = config.rows_and_width(shape)?;
    let (rows, width) = (rows as usize, width as usize);
    let xt = Tensor::from_f32(ctx, x, shape, dtype)?;
    let dyt = Tensor::from_f32(ctx, dy, shape, dtype)?;
    let y = Tensor::zeros(ctx, shape, dtype)?;
    let dx = Tensor::zeros(ctx, shape, dtype)?;
    let rstd = Tensor::zeros(ctx, &[rows], DType::F32)?;
    let w = weight.map(|w| Tensor::from_slice(ctx, w, &[width])).transpose()?;
    let dw = Tensor::zeros(ctx, &[width], DType::F32)?;
    let fwd = ctx
        .kernel_for::<RmsNormKernel>(dtype)?
        .plan_with(ctx.device(), shape, config, options)?;
    let bwd = ctx
        .kernel_for::<RmsNormBackwardKernel>(dtype)?
        .plan_with(ctx.device(), shape, config, options)?;
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    fwd.encode(
        ctx.device(),
        &mut encoder,
        &RmsNormBuffers {
            x: xt.slice(),
            y: y.slice(),
            weight: w.as_ref().map(Tensor::slice),
            rstd: rstd.slice(),
        },
    )?;
    bwd.encode(
        ctx.device(),
        &mut encoder,
        Accumulate::default(),
        &RmsNormBackwardBuffers {
            x: xt.slice(),
            dy: dyt.slice(),
            dx: dx.slice(),
            weight: w.as_ref().map(Tensor::slice),
            rstd: rstd.slice(),
            dweight: config.elementwise_affine.then(|| dw.slice()),
        },
    )?;
    ctx.submit(encoder)?;
    Ok((
        y.to_f64_blocking(ctx)?,
        rstd.to_f64_blocking(ctx)?,
        dx.to_f64_blocking(ctx)?,
        dw.to_f64_blocking(ctx)?,
    ))
}

/// Compares the GPU with the reference on one case; f16 inputs are rounded first and held to
/// the float16 fixtures' tolerance.
fn check(
    ctx: &Context,
    shape: &[usize],
    norm: &[usize],
    dtype: DType,
    affine: bool,
    options: &LayerNormPlanOptions,
    seed: u64,
) {
    let n: usize = shape.iter().product();
    let w: usize = norm.iter().product();
    let mut rng = Rng::new(seed);
    let round = |v: Vec<f32>| -> Vec<f32> {
        match dtype {
            DType::F32 => v,
            DType::F16 => v.into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect(),
        }
    };
    let x = round(rng.normal_vec(n, 0.3, 1.5));
    let dy = round(rng.normal_vec(n, 0.0, 1.0));
    let weight = rng.normal_vec(w, 1.0, 0.5);
    let config = RmsNormConfig {
        normalized_shape: norm.to_vec(),
        eps: Some(1e-6),
        elementwise_affine: affine,
    };
    let gamma = affine.then_some(&weight[..]);
    let (y, rstd, dx, dw) = run(ctx, &x, &dy, gamma, shape, &config, dtype, options)
        .unwrap_or_else(|e| panic!("{shape:?} {dtype} {options:?}: {e}"));
    let wide = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
    let wf = wide(&weight);
    let f = rms_norm_forward(&wide(&x), shape, &config, affine.then_some(&wf[..])).unwrap();
    let g = rms_norm_backward(
        &wide(&x),
        &wide(&dy),
        shape,
        &config,
        affine.then_some(&wf[..]),
        &f.rstd,
    )
    .unwrap();
    let tol = match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
    };
    let mut pairs = vec![("y", &y, &f.y), ("rstd", &rstd, &f.rstd), ("dx", &dx, &g.dx)];
    if affine {
        pairs.push(("dweight", &dw, &g.dweight));
    }
    for (what, got, exp) in pairs {
        let c = compare(got, exp, tol, tol);
        assert!(
            c.passed,
            "{shape:?} {dtype} {options:?} {what}: max_abs_err {:.3e}, {:.2}x the tolerance",
            c.max_abs_err, c.worst_ratio
        );
    }
}

fn geometries() -> Vec<LayerNormPlanOptions> {
    let mut out = vec![LayerNormPlanOptions::default()];
    for lanes in [1, 4, 32, 256] {
        out.push(LayerNormPlanOptions {
            lanes: Some(lanes),
            subgroup_rows: Some(false),
        });
    }
    out
}

const SHAPES: &[(&[usize], &[usize])] = &[
    (&[5, 1], &[1]),
    (&[3, 7], &[7]),
    (&[9, 130], &[130]),
    (&[4, 2, 8], &[2, 8]),
    (&[33, 768], &[768]),
    (&[3, 4099], &[4099]),
    (&[1, 20_011], &[20_011]),
    (&[700, 64], &[64]),
    (&[2, 65_536], &[65_536]),
];

#[test]
fn rms_norm_matches_the_reference_on_every_geometry() {
    let ctx = gpu!();
    for options in geometries() {
        for (i, (shape, norm)) in SHAPES.iter().enumerate() {
            check(&ctx, shape, norm, DType::F32, i % 3 != 2, &options, 10 + i as u64);
        }
    }
}

#[test]
fn rms_norm_f16_on_both_storage_paths() {
    let ctx = gpu!();
    let packed = Context::with_options_blocking(ContextOptions {
        force_packed_f16: true,
        ..Default::default()
    })
    .unwrap();
    for c in [&ctx, &packed] {
        for options in [LayerNormPlanOptions::default(), geometries()[1]] {
            for (i, (shape, norm)) in SHAPES.iter().enumerate().take(6) {
                check(c, shape, norm, DType::F16, true, &options, 40 + i as u64);
            }
        }
    }
}

#[test]
fn rms_norm_splits_past_the_binding_limit() {
    let ctx = gpu!();
    let small = Context::with_options_blocking(ContextOptions {
        limits: Some(normdrop::wgpu::Limits {
            max_storage_buffer_binding_size: 64 << 10,
            ..ctx.limits()
        }),
        ..Default::default()
    })
    .unwrap();
    for options in [LayerNormPlanOptions::default(), geometries()[1], geometries()[3]] {
        check(&small, &[700, 101], &[101], DType::F32, true, &options, 70);
        check(&small, &[333, 64], &[64], DType::F32, true, &options, 71);
    }
}

#[test]
fn rms_norm_refuses_bad_input_naming_rms_norm() {
    let ctx = gpu!();
    let kernel = ctx.kernel::<RmsNormKernel>().unwrap();
    let config = RmsNormConfig::new(&[8]);
    let e = kernel.plan(ctx.device(), &[3, 7], &config).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "rms_norm", .. }), "{e}");
    let forced = LayerNormPlanOptions {
        lanes: Some(1),
        subgroup_rows: Some(true),
    };
    // The row-per-subgroup passes take widths that are multiples of 4 (and only CPU adapters
    // with SUBGROUP have them at all).
    let odd = RmsNormConfig::new(&[10]);
    let e = kernel.plan_with(ctx.device(), &[3, 10], &odd, &forced).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let plan = kernel.plan(ctx.device(), &[3, 8], &config).unwrap();
    let x = Tensor::zeros(&ctx, &[3, 8], DType::F32).unwrap();
    let w = Tensor::zeros(&ctx, &[8], DType::F32).unwrap();
    let rstd = Tensor::zeros(&ctx, &[3], DType::F32).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let e = plan
        .encode(
            ctx.device(),
            &mut encoder,
            &RmsNormBuffers {
                x: x.slice(),
                y: x.slice(),
                weight: Some(w.slice()),
                rstd: rstd.slice(),
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aliased {
                op: "rms_norm",
                what: "y",
                other: "x",
                ..
            }
        ),
        "{e}"
    );
    let e = plan
        .encode(
            ctx.device(),
            &mut encoder,
            &RmsNormBuffers {
                x: x.slice(),
                y: Tensor::zeros(&ctx, &[3, 8], DType::F32).unwrap().slice(),
                weight: None,
                rstd: rstd.slice(),
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Buffer {
                op: "rms_norm",
                what: "weight",
                ..
            }
        ),
        "{e}"
    );
    // A plain plan cannot record the residual block (it would leave h unwritten), nor a plain
    // backward plan the block's backward.
    let scratch = |shape: &[usize]| Tensor::zeros(&ctx, shape, DType::F32).unwrap();
    let (res, h, y2, rng) = (scratch(&[3, 8]), scratch(&[3, 8]), scratch(&[3, 8]), scratch(&[4]));
    let e = plan
        .encode_residual(
            ctx.device(),
            &mut encoder,
            true,
            &normdrop::RmsNormResidualBuffers {
                x: x.slice(),
                residual: res.slice(),
                h: h.slice(),
                y: y2.slice(),
                weight: Some(w.slice()),
                rstd: rstd.slice(),
                rng: rng.slice(),
            },
        )
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { op: "rms_norm", .. }), "{e}");
    let bplan = ctx
        .kernel::<RmsNormBackwardKernel>()
        .unwrap()
        .plan(ctx.device(), &[3, 8], &config)
        .unwrap();
    let (dx, dres, dw) = (scratch(&[3, 8]), scratch(&[3, 8]), scratch(&[8]));
    let e = bplan
        .encode_residual(
            ctx.device(),
            &mut encoder,
            Accumulate::default(),
            &normdrop::RmsNormResidualBackwardBuffers {
                h: h.slice(),
                dy: y2.slice(),
                dx: dx.slice(),
                dresidual: dres.slice(),
                dh_in: None,
                weight: Some(w.slice()),
                rstd: rstd.slice(),
                dweight: Some(dw.slice()),
                rng: rng.slice(),
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                op: "rms_norm backward",
                ..
            }
        ),
        "{e}"
    );
    let mut c = RmsNormConfig::new(&[8]);
    c.eps = Some(-1.0);
    assert!(matches!(
        kernel.plan(ctx.device(), &[3, 8], &c),
        Err(Error::InvalidArgument { op: "rms_norm", .. })
    ));
}

#[test]
fn rms_norm_module_trains_and_refuses_misuse() {
    let ctx = gpu!();
    let other = Context::new_blocking().unwrap();
    let shape = [6, 24];
    let mut rng = Rng::new(90);
    let x: Vec<f32> = rng.normal_vec(144, 0.2, 1.0);
    let dy: Vec<f32> = rng.normal_vec(144, 0.0, 1.0);
    let weight: Vec<f32> = rng.normal_vec(24, 1.0, 0.3);
    let mut m = normdrop::RmsNorm::new(&ctx, &[24]).unwrap();
    assert_eq!(m.config().eps(), f32::EPSILON);
    let xt = Tensor::from_slice(&ctx, &x, &shape).unwrap();
    let dyt = Tensor::from_slice(&ctx, &dy, &shape).unwrap();
    assert!(matches!(m.backward(&dyt), Err(Error::State { .. })));
    m.set_weight(&weight).unwrap();
    assert!(matches!(m.set_weight(&[1.0; 3]), Err(Error::Shape { .. })));
    let y = m.forward(&xt).unwrap();
    let g = m.backward(&dyt).unwrap();
    assert!(g.dbias.is_none());
    let wide = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
    let config = m.config().clone();
    let f = rms_norm_forward(&wide(&x), &shape, &config, Some(&wide(&weight))).unwrap();
    let r = rms_norm_backward(&wide(&x), &wide(&dy), &shape, &config, Some(&wide(&weight)), &f.rstd).unwrap();
    common::assert_close("y", &y.to_vec_blocking::<f32>(&ctx).unwrap(), &f.y, 1e-4, 1e-4);
    common::assert_close("dx", &g.dx.to_vec_blocking::<f32>(&ctx).unwrap(), &r.dx, 1e-4, 1e-4);
    let dw = g.dweight.as_ref().unwrap().to_vec_blocking::<f32>(&ctx).unwrap();
    common::assert_close("dweight", &dw, &r.dweight, 1e-4, 1e-4);
    // Misuse changes nothing: the saved statistics stay those of the good forward.
    let rstd_before = m.saved().unwrap().rstd.to_vec_blocking::<f32>(&ctx).unwrap();
    let foreign = Tensor::from_slice(&other, &x, &shape).unwrap();
    assert!(matches!(m.forward(&foreign), Err(Error::WrongDevice { what: "x", .. })));
    assert!(matches!(
        m.forward(&Tensor::zeros(&ctx, &[6, 23], DType::F32).unwrap()),
        Err(Error::Shape { .. })
    ));
    let dweight = Tensor::zeros(&ctx, &[24], DType::F32).unwrap();
    let e = m.backward_into(
        &dyt,
        normdrop::GradTargets {
            dx: &dyt,
            dweight: Some(&dweight),
            dbias: None,
        },
        Accumulate::default(),
    );
    assert!(
        matches!(
            e,
            Err(Error::Aliased {
                what: "dx",
                other: "dy",
                ..
            })
        ),
        "{e:?}"
    );
    let e = m.backward_into(
        &dyt,
        normdrop::GradTargets {
            dx: &Tensor::zeros(&ctx, &shape, DType::F32).unwrap(),
            dweight: Some(&dweight),
            dbias: Some(&dweight),
        },
        Accumulate::default(),
    );
    assert!(matches!(e, Err(Error::InvalidArgument { .. })), "{e:?}");
    assert_eq!(
        m.saved().unwrap().rstd.to_vec_blocking::<f32>(&ctx).unwrap(),
        rstd_before
    );
    assert_eq!(m.saved().unwrap().shape, shape);
}

/// The fused residual block against its definition: `h = residual + x·m` with the unfused
/// dropout's mask for the same (seed, offset), `y = RMSNorm(h)`; backward `dh = dRMSNorm(dy) +
/// dh_in`, `dresidual = dh`, `dx = dh·m`; the generator advances once per training call.
#[test]
fn residual_rms_block_matches_its_definition() {
    let ctx = gpu!();
    let cases = [
        ([37usize, 96usize], DType::F32),
        ([9, 1000], DType::F32),
        ([11, 130], DType::F16),
    ];
    for ((shape, dtype), lanes) in cases.into_iter().flat_map(|c| [(c, None), (c, Some(32))]) {
        let w = shape[1];
        let n = shape[0] * w;
        let mut rng = Rng::new(500 + w as u64);
        let round = |v: Vec<f32>| -> Vec<f32> {
            match dtype {
                DType::F32 => v,
                DType::F16 => v.into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect(),
            }
        };
        let (x, r, dy, dh_in) = (
            round(rng.normal_vec(n, 0.0, 1.0)),
            round(rng.normal_vec(n, 0.5, 1.0)),
            round(rng.normal_vec(n, 0.0, 1.0)),
            round(rng.normal_vec(n, 0.0, 0.5)),
        );
        let gamma = rng.normal_vec(w, 1.0, 0.3);
        let dropout = normdrop::DropoutConfig::new(0.25);
        let mut block = normdrop::ResidualDropoutRmsNorm::new(&ctx, RmsNormConfig::new(&[w]), dropout, 7).unwrap();
        block.rms_norm_mut().set_weight(&gamma).unwrap();
        block.rms_norm_mut().set_plan_options(LayerNormPlanOptions {
            lanes,
            subgroup_rows: None,
        });
        block.set_state(7, 3);
        let t = |v: &[f32]| Tensor::from_f32(&ctx, v, &shape, dtype).unwrap();
        let (y, h) = block.forward(&t(&x), &t(&r)).unwrap();
        assert_eq!(block.state(), (7, 4), "a training call advances the offset once");
        let g = block.backward(&t(&dy), Some(&t(&dh_in))).unwrap();
        assert!(g.dbias.is_none());
        // The reference, from the unfused dropout's factors at (7, 3).
        let ones = vec![1.0f32; n];
        let (m, _) =
            normdrop::reference::dropout_forward(&ones, &shape, &dropout, normdrop::DropoutUnit::Element, 7, 3, true)
                .unwrap();
        let h_ref: Vec<f64> = (0..n)
            .map(|i| {
                let hv = r[i] + (f64::from(x[i]) * m[i]) as f32;
                f64::from(match dtype {
                    DType::F32 => hv,
                    DType::F16 => half::f16::from_f32(hv).to_f32(),
                })
            })
            .collect();
        let wide = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
        let config = RmsNormConfig::new(&[w]);
        let f = rms_norm_forward(&h_ref, &shape, &config, Some(&wide(&gamma))).unwrap();
        let rg = rms_norm_backward(&h_ref, &wide(&dy), &shape, &config, Some(&wide(&gamma)), &f.rstd).unwrap();
        let dh: Vec<f64> = rg.dx.iter().zip(&dh_in).map(|(a, &b)| a + f64::from(b)).collect();
        let dx: Vec<f64> = dh.iter().zip(&m).map(|(a, b)| a * b).collect();
        let tol = if dtype == DType::F32 { 1e-4 } else { 4e-3 };
        let read = |t: &Tensor| t.to_f64_blocking(&ctx).unwrap();
        for (what, got, exp) in [
            ("h", read(&h), h_ref.clone()),
            ("y", read(&y), f.y.clone()),
            ("dresidual", read(&g.dresidual), dh.clone()),
            ("dx", read(&g.dx), dx),
            ("dweight", read(g.dweight.as_ref().unwrap()), rg.dweight.clone()),
        ] {
            let c = compare(&got, &exp, tol, tol);
            assert!(
                c.passed,
                "{shape:?} {dtype} lanes {lanes:?} {what}: max_abs_err {:.3e}, {:.2}x",
                c.max_abs_err, c.worst_ratio
            );
        }
        // The plain RMSNorm backward refuses a residual forward's statistics.
        assert!(matches!(
            block.rms_norm_mut().backward(&t(&dy)),
            Err(Error::State { .. })
        ));
    }
}
