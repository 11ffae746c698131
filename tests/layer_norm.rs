//! LayerNorm forward on the GPU against PyTorch fixtures and the f64 CPU reference.

mod common;
#[path = "common/ln_case.rs"]
mod ln_case;

use common::{assert_close, Rng};
use ln_case::LanesCase;
use normdrop::reference::layer_norm_forward;
use normdrop::tuning::LayerNormPlanOptions;
use normdrop::tuning::ONCHIP_MAX_WIDTH;
use normdrop::{
    Context, DType, DropoutConfig, Error, LayerNorm, LayerNormBackwardKernel, LayerNormBuffers, LayerNormConfig,
    LayerNormFusion, LayerNormKernel, Tensor,
};
use normdrop_cli::fixture::{self, Fixture, Verdict};
use proptest::prelude::*;

const RTOL: f64 = 1e-4;
const ATOL: f64 = 1e-5;
const OFFSET_TOL: f64 = 1e-4;

#[test]
fn layer_norm_fixtures_pass_including_gradients() {
    let ctx = gpu!();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/torch");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("ln"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "expected the layer_norm fixtures in {dir}");
    let mut passed = 0;
    for path in files {
        let fx = Fixture::load(&path).unwrap();
        assert_eq!(fx.op, "layer_norm");
        for line in fixture::check(&ctx, &fx).unwrap() {
            match &line.verdict {
                Verdict::Pass(_) => passed += 1,
                _ => panic!("{line}"),
            }
        }
    }
    assert_eq!(passed, 39, "y, mean, rstd, dx, dweight, dbias of 7 fixtures");
}

fn read(ctx: &Context, t: &Tensor) -> Vec<f32> {
    t.to_vec_blocking(ctx).unwrap()
}

/// Runs the module on random data and checks y, mean and rstd against the reference.
fn check_against_reference(ctx: &Context, shape: &[usize], config: &LayerNormConfig, offset: f64, seed: u64) {
    let mut rng = Rng::new(seed);
    let numel: usize = shape.iter().product();
    let w = config.width();
    let x = rng.normal_vec(numel, offset, if offset == 0.0 { 1.0 } else { 0.1 });
    let weight = rng.normal_vec(w, 1.0, 0.5);
    let bias = rng.normal_vec(w, 0.0, 0.5);
    let mut ln = LayerNorm::with_config(ctx, config.clone()).unwrap();
    if config.has_weight() {
        ln.set_weight(&weight).unwrap();
    }
    if config.has_bias() {
        ln.set_bias(&bias).unwrap();
    }
    let y = ln.forward(&Tensor::from_slice(ctx, &x, shape).unwrap()).unwrap();
    let xf: Vec<f64> = x.iter().map(|&v| v.into()).collect();
    let r = layer_norm_forward(&xf, shape, config, Some(&weight), Some(&bias)).unwrap();
    let what = format!("shape {shape:?} {config:?}");
    let tol = if offset == 0.0 {
        (RTOL, ATOL)
    } else {
        (OFFSET_TOL, OFFSET_TOL)
    };
    assert_close(&format!("{what} y"), &read(ctx, &y), &r.y, tol.0, tol.1);
    let saved = ln.saved().unwrap();
    assert_close(&format!("{what} mean"), &read(ctx, &saved.mean), &r.mean, tol.0, tol.1);
    assert_close(&format!("{what} rstd"), &read(ctx, &saved.rstd), &r.rstd, tol.0, tol.1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn gpu_matches_reference_on_random_shapes(
        lead in prop::collection::vec(1usize..6, 0..3),
        norm in prop::collection::vec(1usize..40, 1..3),
        wide: bool,
        affine: bool,
        bias: bool,
        eps in prop_oneof![Just(1e-5f32), Just(1e-2)],
        off_centre: bool,
        seed: u64,
    ) {
        let Some(ctx) = common::ctx() else { return Ok(()) };
        // Now and then a row wider than the on-chip limit, to take the two-read path.
        let normalized_shape = if wide { vec![ONCHIP_MAX_WIDTH + norm[0]] } else { norm };
        let mut shape = lead;
        shape.extend(&normalized_shape);
        let config = LayerNormConfig { normalized_shape, eps, elementwise_affine: affine, bias };
        check_against_reference(&ctx, &shape, &config, if off_centre { 1000.0 } else { 0.0 }, seed);
    }
}

#[test]
fn widths_from_1_to_65537() {
    let ctx = gpu!();
    for width in [
        1usize, 2, 3, 31, 255, 256, 257, 1000, 4095, 4096, 4097, 8191, 65536, 65537,
    ] {
        let rows = if width > 10_000 { 3 } else { 5 };
        check_against_reference(&ctx, &[rows, width], &LayerNormConfig::new(&[width]), 0.0, width as u64);
    }
}

#[test]
fn off_centre_rows_are_stable_on_both_paths() {
    let ctx = gpu!();
    for width in [512usize, 768, 20_000] {
        check_against_reference(&ctx, &[4, width], &LayerNormConfig::new(&[width]), 1000.0, 3);
    }
}

#[test]
fn many_rows_fold_the_dispatch() {
    let ctx = gpu!();
    // 70000 rows > 65535 workgroups per dimension.
    check_against_reference(&ctx, &[70_000, 3], &LayerNormConfig::new(&[3]), 0.0, 5);
}

/// Every geometry a plan can take (1 to 256 invocations per row; the register path up to 16
/// values per lane, the two-read path beyond; rows on and off the mask's 4-element quads)
/// gives the reference's forward and backward, plain, fused with dropout and as the residual
/// block. The device's own policy picks only some of them (a CPU driver few lanes, a GPU
/// 8..=256), so this runs the GPU's geometry on a CPU driver and the reverse. One lane per
/// row is also the backward's row-block path (64-row workgroups, dγ/dβ partials in the same
/// pass).
#[test]
fn every_lanes_choice_matches_the_reference() {
    let ctx = gpu!();
    let mut rng = Rng::new(14);
    let fusions = [
        LayerNormFusion::None,
        LayerNormFusion::Dropout(DropoutConfig::new(0.5)),
        LayerNormFusion::ResidualDropout(DropoutConfig::new(0.5)),
    ];
    for (rows, width) in [
        (37usize, 1usize),
        (37, 7),
        (37, 16),
        (21, 18),
        (9, 300),
        (9, 768),
        // The backward's row-block pass reads γ of the first 4096 columns from a uniform copy
        // and the rest from storage: rows past it, of whole quads (4100, vec4) and not (4103).
        (3, 4100),
        (3, 4103),
        // The row-block paths' column tiles (three slots of 64 column quads) and the slots
        // after them, on rows off the quads.
        (5, 1283),
        // Several 64-row blocks for the backward's row-block path (lanes 1), the last partial.
        (150, 20),
        (70, 9),
    ] {
        let case = LanesCase::new(&mut rng, rows, width);
        for lanes in (0..=8).map(|k| 1u32 << k) {
            for fusion in fusions {
                case.check(&ctx, lanes, fusion);
            }
        }
        // One lane per row takes the row-per-subgroup forward where the device has it (see
        // subgroup_rows_*): the row-block forward too.
        let blocks = LayerNormPlanOptions {
            lanes: Some(1),
            subgroup_rows: Some(false),
        };
        for fusion in fusions {
            case.check_with(&ctx, &blocks, fusion);
        }
    }
    // Without γ and β: the row-block backward reads the ones its plan's uniform copy was
    // created with (there is no γ to stage); the lane paths read no γ at all.
    for (rows, width) in [(150, 20), (3, 4100)] {
        let case = LanesCase::new(&mut rng, rows, width).without_affine();
        for lanes in [1, 32] {
            for fusion in fusions {
                case.check(&ctx, lanes, fusion);
            }
        }
    }
    // Not a power of two, or past 256: refused by both plans before anything is built.
    let (forward, backward) = (
        ctx.kernel::<LayerNormKernel>().unwrap(),
        ctx.kernel::<LayerNormBackwardKernel>().unwrap(),
    );
    for lanes in [0u32, 3, 12, 512] {
        let options = LayerNormPlanOptions {
            lanes: Some(lanes),
            ..Default::default()
        };
        let config = LayerNormConfig::new(&[8]);
        let e = forward
            .plan_with(ctx.device(), &[2, 8], &config, LayerNormFusion::None, &options)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{lanes}: {e}");
        let e = backward
            .plan_with(ctx.device(), &[2, 8], &config, LayerNormFusion::None, true, &options)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{lanes}: {e}");
    }
}

#[test]
fn bad_input_is_rejected() {
    let ctx = gpu!();
    let bad = |config: LayerNormConfig| LayerNorm::with_config(&ctx, config).unwrap_err();
    assert!(matches!(bad(LayerNormConfig::new(&[])), Error::InvalidArgument { .. }));
    assert!(matches!(
        bad(LayerNormConfig::new(&[4, 0])),
        Error::InvalidArgument { .. }
    ));
    for eps in [0.0, -1.0, f32::NAN] {
        assert!(matches!(
            bad(LayerNormConfig {
                eps,
                ..LayerNormConfig::new(&[4])
            }),
            Error::InvalidArgument { .. }
        ));
    }
    let mut ln = LayerNorm::new(&ctx, &[4, 5]).unwrap();
    let t = |shape: &[usize]| Tensor::zeros(&ctx, shape, DType::F32).unwrap();
    // Trailing dims must equal normalized_shape.
    for shape in [&[5, 4][..], &[3, 4], &[5], &[2, 4, 6]] {
        let e = ln.forward(&t(shape)).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{shape:?}: {e}");
    }
    assert!(matches!(ln.forward(&t(&[0, 4, 5])), Err(Error::Shape { .. })));
    // Weight and bias of the wrong length; no bias when bias = false.
    assert!(matches!(ln.set_weight(&[1.0; 19]), Err(Error::Shape { .. })));
    assert!(matches!(ln.set_bias(&[1.0; 21]), Err(Error::Shape { .. })));
    let mut no_bias = LayerNorm::with_config(
        &ctx,
        LayerNormConfig {
            bias: false,
            ..LayerNormConfig::new(&[4])
        },
    )
    .unwrap();
    assert!(matches!(no_bias.set_bias(&[0.0; 4]), Err(Error::State { .. })));
    assert_eq!(
        read(&ctx, ln.weight().unwrap()),
        vec![1.0; 20],
        "a failed set changed γ"
    );
    assert!(ln.saved().is_none(), "failed calls must not save anything");
    // A gradient whose dtype differs from the forward's input.
    ln.forward(&Tensor::zeros(&ctx, &[4, 5], DType::F16).unwrap()).unwrap();
    assert!(matches!(
        ln.backward(&Tensor::zeros(&ctx, &[4, 5], DType::F32).unwrap()),
        Err(Error::DType { .. })
    ));

    // Low level: buffers too small, missing pieces, aliasing.
    let device = ctx.device();
    let kernel = ctx.kernel::<LayerNormKernel>().unwrap();
    let config = LayerNormConfig::new(&[8]);
    let plan = kernel
        .plan(
            device,
            &[3, 8],
            &config,
            LayerNormFusion::Dropout(DropoutConfig::new(0.5)),
        )
        .unwrap();
    let (x, y, w, b) = (t(&[3, 8]), t(&[3, 8]), t(&[8]), t(&[8]));
    let (mean, rstd, rng, small) = (t(&[3]), t(&[3]), t(&[4]), t(&[2]));
    let args = || LayerNormBuffers {
        x: x.slice(),
        y: y.slice(),
        weight: Some(w.slice()),
        bias: Some(b.slice()),
        mean: mean.slice(),
        rstd: rstd.slice(),
        rng: Some(rng.slice()),
        residual: None,
        h: None,
    };
    plan.validate(&args()).unwrap();
    let check = |buffers: LayerNormBuffers<'_>, what: &str| {
        let e = plan.validate(&buffers).unwrap_err();
        let named = match &e {
            Error::BufferTooSmall { what, .. } | Error::Buffer { what, .. } | Error::Aliased { what, .. } => *what,
            other => panic!("{other}"),
        };
        assert_eq!(named, what, "{e}");
    };
    check(
        LayerNormBuffers {
            mean: small.slice(),
            ..args()
        },
        "mean",
    );
    check(
        LayerNormBuffers {
            weight: Some(small.slice()),
            ..args()
        },
        "weight",
    );
    check(LayerNormBuffers { bias: None, ..args() }, "bias");
    check(LayerNormBuffers { rng: None, ..args() }, "rng");
    check(
        LayerNormBuffers {
            rng: Some(small.buffer().slice(..4)),
            ..args()
        },
        "rng",
    );
    check(LayerNormBuffers { y: x.slice(), ..args() }, "y");
    check(
        LayerNormBuffers {
            rstd: w.slice(),
            ..args()
        },
        "rstd",
    );
    let residual_plan = kernel
        .plan(
            device,
            &[3, 8],
            &config,
            LayerNormFusion::ResidualDropout(DropoutConfig::new(0.5)),
        )
        .unwrap();
    let e = residual_plan.validate(&args()).unwrap_err();
    assert!(matches!(e, Error::Buffer { what: "residual", .. }), "{e}");
}

#[test]
fn state_round_trips_with_pytorch_keys() {
    let ctx = gpu!();
    let mut ln = LayerNorm::new(&ctx, &[2, 3]).unwrap();
    ln.set_weight(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    ln.set_bias(&[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]).unwrap();
    let bytes = ln.state_to_safetensors("ln.").unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<_> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(names, ["ln.bias", "ln.weight"]);
    assert_eq!(st.tensor("ln.weight").unwrap().shape(), &[2, 3]);

    let mut other = LayerNorm::new(&ctx, &[2, 3]).unwrap();
    other.load_state_from_safetensors(&bytes, "ln.").unwrap();
    assert_eq!(read(&ctx, other.weight().unwrap()), read(&ctx, ln.weight().unwrap()));
    assert_eq!(read(&ctx, other.bias().unwrap()), read(&ctx, ln.bias().unwrap()));
    // A different normalized_shape or a missing key: an error, and nothing changes.
    let mut wrong = LayerNorm::new(&ctx, &[6]).unwrap();
    assert!(matches!(
        wrong.load_state_from_safetensors(&bytes, "ln."),
        Err(Error::SafeTensors(_))
    ));
    assert!(matches!(
        other.load_state_from_safetensors(&bytes, "x."),
        Err(Error::SafeTensors(_))
    ));
    assert_eq!(read(&ctx, wrong.weight().unwrap()), vec![1.0; 6]);
}

/// The row-per-subgroup passes (CPU adapters with SUBGROUP of 8 lanes or more: the forward,
/// `shaders/cpu/layer_norm/forward_rows.wgsl`, and the backward's dx pass,
/// `shaders/cpu/layer_norm/backward_rows.wgsl`, and the residual block's twins) give the
/// reference's y, h, mean, rstd, dx, dresidual, dγ and dβ (writing and accumulating), plain,
/// with dropout (the CPU twin's mask) and as the residual block, for each of their entry
/// points' register budgets (2, 4 and 8 triples of quads per lane: widths up to 192, 384 and
/// 768), partial last triples, a last 64-row block that is partial, and without γ and β. On
/// devices without them the forced option is refused; everywhere the widths and geometries
/// they cannot take are refused, and the default takes them exactly where they can.
#[test]
fn subgroup_rows_match_the_reference_where_the_device_has_them() {
    let ctx = gpu!();
    let device = ctx.device();
    let info = device.adapter_info();
    let has = ctx.features().contains(wgpu::Features::SUBGROUP)
        && info.device_type == wgpu::DeviceType::Cpu
        && info.subgroup_min_size >= 8;
    let forced = LayerNormPlanOptions {
        lanes: Some(1),
        subgroup_rows: Some(true),
    };
    let (forward, backward) = (
        ctx.kernel::<LayerNormKernel>().unwrap(),
        ctx.kernel::<LayerNormBackwardKernel>().unwrap(),
    );
    // Whether the forward and the backward plan take the subgroup passes (or the error).
    let plans = |shape: &[usize], fusion, options: &LayerNormPlanOptions| -> Result<(bool, bool), Error> {
        let config = LayerNormConfig::new(&shape[1..]);
        let f = forward.plan_with(device, shape, &config, fusion, options)?;
        let b = backward.plan_with(device, shape, &config, fusion, true, options)?;
        Ok((f.subgroup_rows(), b.subgroup_rows()))
    };
    let drop = LayerNormFusion::Dropout(DropoutConfig::new(0.5));
    let residual = LayerNormFusion::ResidualDropout(DropoutConfig::new(0.5));
    let by_default = |lanes| LayerNormPlanOptions {
        lanes: Some(lanes),
        ..Default::default()
    };
    // Refused everywhere: a width off the quads, one past 96 per lane, a lane-segment
    // geometry; the default takes the other passes there.
    let widest = 768;
    for (shape, fusion, lanes) in [
        (vec![4, 10], LayerNormFusion::None, 1),
        (vec![4, widest + 4], LayerNormFusion::None, 1),
        (vec![4, 64], LayerNormFusion::None, 8),
    ] {
        let options = LayerNormPlanOptions {
            lanes: Some(lanes),
            subgroup_rows: Some(true),
        };
        let e = plans(&shape, fusion, &options).unwrap_err();
        assert!(
            matches!(e, Error::Unsupported { .. }),
            "{shape:?} {fusion:?} lanes {lanes}: {e}"
        );
        assert_eq!(
            plans(&shape, fusion, &by_default(lanes)).unwrap(),
            (false, false),
            "{shape:?} {fusion:?}"
        );
    }
    if !has {
        let e = plans(&[4, 64], LayerNormFusion::None, &forced).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        return;
    }
    let refused = LayerNormPlanOptions {
        lanes: Some(1),
        subgroup_rows: Some(false),
    };
    assert_eq!(plans(&[4, 64], drop, &refused).unwrap(), (false, false));
    let mut rng = Rng::new(31);
    for (rows, width) in [
        (1usize, 4usize),
        (70, 8),
        (9, 100),
        (65, 192),
        (64, 196),
        (3, 384),
        (17, 388),
        (5, 764),
        (130, widest),
    ] {
        let case = LanesCase::new(&mut rng, rows, width);
        for fusion in [LayerNormFusion::None, drop, residual] {
            assert_eq!(plans(&[rows, width], fusion, &by_default(1)).unwrap(), (true, true));
            case.check_with(&ctx, &forced, fusion);
        }
    }
    let case = LanesCase::new(&mut rng, 66, 128).without_affine();
    for fusion in [LayerNormFusion::None, drop, residual] {
        case.check_with(&ctx, &forced, fusion);
    }
}
