//! Backward passes on the GPU against the f64 CPU reference (itself checked against finite
//! differences in `reference.rs`), fused backward against the unfused chain, accumulation, and
//! bad input.

mod common;

use common::{assert_close, Rng};
use normdrop::reference::{
    batch_norm_backward, batch_norm_forward, dropout_backward, layer_norm_backward, layer_norm_forward, widen,
    RefRunningStats,
};
use normdrop::tuning::ReduceSplit;
use normdrop::{
    Accumulate, BatchNorm, BatchNormConfig, BatchNormDropout, Context, DType, Dropout, Dropout2d, DropoutConfig,
    DropoutMode, DropoutUnit, Error, GradTargets, Grads, LayerNorm, LayerNormConfig, LayerNormDropout,
    ResidualDropoutLayerNorm, Tensor,
};
use proptest::prelude::*;

const RTOL: f64 = 1e-4;
const ATOL: f64 = 1e-5;

fn read(ctx: &Context, t: &Tensor) -> Vec<f32> {
    t.to_vec_blocking(ctx).unwrap()
}

fn upload(ctx: &Context, v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(ctx, v, shape).unwrap()
}

/// BatchNorm forward + backward on the GPU against the reference.
fn check_batch_norm(
    ctx: &Context,
    shape: &[usize],
    config: &BatchNormConfig,
    training: bool,
    split: ReduceSplit,
    offset: f64,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let c = shape[1];
    let numel: usize = shape.iter().product();
    let x = rng.normal_vec(numel, offset, if offset == 0.0 { 1.0 } else { 0.1 });
    let dy = rng.normal_vec(numel, 0.0, 1.0);
    let gamma = rng.normal_vec(c, 1.0, 0.5);
    let beta = rng.normal_vec(c, 0.0, 0.5);
    let mut bn = BatchNorm::with_config(ctx, config.clone()).unwrap();
    bn.set_reduce_split(Some(split));
    if config.affine {
        bn.set_weight(&gamma).unwrap();
        bn.set_bias(&beta).unwrap();
    }
    let mut running = RefRunningStats::new(c);
    if config.track_running_stats {
        let rm = rng.normal_vec(c, offset, 0.1);
        let rv: Vec<f32> = (0..c).map(|_| 0.5 + rng.uniform() as f32).collect();
        bn.set_running_mean(&rm).unwrap();
        bn.set_running_var(&rv).unwrap();
        running = RefRunningStats {
            mean: widen(&rm),
            var: widen(&rv),
            num_batches_tracked: 0,
        };
    }
    if !training {
        bn.eval();
    }
    bn.forward(&upload(ctx, &x, shape)).unwrap();
    let g = bn.backward(&upload(ctx, &dy, shape)).unwrap();
    let fwd = batch_norm_forward(
        &x,
        shape,
        config,
        Some(&gamma),
        Some(&beta),
        Some(&mut running),
        training,
    )
    .unwrap();
    let batch_stats = training || !config.track_running_stats;
    let r = batch_norm_backward(
        &widen(&x),
        &widen(&dy),
        shape,
        config,
        Some(&widen(&gamma)),
        &fwd.mean,
        &fwd.invstd,
        batch_stats,
    )
    .unwrap();
    let what = format!("BN {shape:?} {config:?} training={training} {split:?} offset={offset}");
    assert_close(&format!("{what} dx"), &read(ctx, &g.dx), &r.dx, RTOL, ATOL);
    if config.affine {
        assert_close(
            &format!("{what} dweight"),
            &read(ctx, g.dweight.as_ref().unwrap()),
            &r.dweight,
            RTOL,
            ATOL,
        );
        assert_close(
            &format!("{what} dbias"),
            &read(ctx, g.dbias.as_ref().unwrap()),
            &r.dbias,
            RTOL,
            ATOL,
        );
    } else {
        assert!(g.dweight.is_none() && g.dbias.is_none());
    }
}

fn check_layer_norm(ctx: &Context, shape: &[usize], config: &LayerNormConfig, offset: f64, seed: u64) {
    let mut rng = Rng::new(seed);
    let numel: usize = shape.iter().product();
    let w = config.width();
    let x = rng.normal_vec(numel, offset, if offset == 0.0 { 1.0 } else { 0.1 });
    let dy = rng.normal_vec(numel, 0.0, 1.0);
    let gamma = rng.normal_vec(w, 1.0, 0.5);
    let mut ln = LayerNorm::with_config(ctx, config.clone()).unwrap();
    if config.has_weight() {
        ln.set_weight(&gamma).unwrap();
    }
    ln.forward(&upload(ctx, &x, shape)).unwrap();
    let g = ln.backward(&upload(ctx, &dy, shape)).unwrap();
    let fwd = layer_norm_forward(&widen(&x), shape, config, Some(&gamma), None).unwrap();
    let r = layer_norm_backward(
        &widen(&x),
        &widen(&dy),
        shape,
        config,
        Some(&widen(&gamma)),
        &fwd.mean,
        &fwd.rstd,
    )
    .unwrap();
    let what = format!("LN {shape:?} {config:?} offset={offset}");
    // Column sums over many rows accumulate rounding; scale atol by √rows.
    let rows = (numel / w) as f64;
    assert_close(&format!("{what} dx"), &read(ctx, &g.dx), &r.dx, RTOL, ATOL);
    if config.has_weight() {
        let dw = read(ctx, g.dweight.as_ref().unwrap());
        assert_close(&format!("{what} dweight"), &dw, &r.dweight, RTOL, ATOL * rows.sqrt());
    }
    if config.has_bias() {
        let db = read(ctx, g.dbias.as_ref().unwrap());
        assert_close(&format!("{what} dbias"), &db, &r.dbias, RTOL, ATOL * rows.sqrt());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn batch_norm_gradients_match_reference(
        n in 1usize..5,
        c in 1usize..12,
        spatial in prop::collection::vec(1usize..10, 0..3),
        affine: bool,
        track: bool,
        training: bool,
        split in common::reduce_splits(),
        off_centre: bool,
        seed: u64,
    ) {
        let Some(ctx) = common::ctx() else { return Ok(()) };
        let mut shape = vec![n, c];
        shape.extend(spatial);
        let m: usize = shape.iter().product::<usize>() / c;
        let config = BatchNormConfig { affine, track_running_stats: track, ..BatchNormConfig::new(c) };
        prop_assume!(m > 1 || (!training && track));
        check_batch_norm(&ctx, &shape, &config, training, split, if off_centre { 1000.0 } else { 0.0 }, seed);
    }

    #[test]
    fn layer_norm_gradients_match_reference(
        lead in prop::collection::vec(1usize..6, 0..3),
        width in prop_oneof![1usize..40, 4090usize..4110],
        affine: bool,
        bias: bool,
        off_centre: bool,
        seed: u64,
    ) {
        let Some(ctx) = common::ctx() else { return Ok(()) };
        let mut shape = lead;
        shape.push(width);
        let config = LayerNormConfig { elementwise_affine: affine, bias, ..LayerNormConfig::new(&[width]) };
        check_layer_norm(&ctx, &shape, &config, if off_centre { 1000.0 } else { 0.0 }, seed);
    }
}

#[test]
fn pinned_gradient_cases() {
    let ctx = gpu!();
    let cfg = BatchNormConfig::new;
    // M = 2 (the smallest batch statistics), primes, off-centre, many chunks, eval; each with
    // workgroup chunks and with invocation chunks of one and of 25 quads.
    for split in [
        ReduceSplit::Workgroup { chunk: 256 },
        ReduceSplit::Invocation { chunk: 4 },
        ReduceSplit::Invocation { chunk: 100 },
    ] {
        check_batch_norm(&ctx, &[2, 5], &cfg(5), true, split, 0.0, 1);
        check_batch_norm(&ctx, &[1, 3, 2], &cfg(3), true, split, 1000.0, 2);
        check_batch_norm(&ctx, &[7, 13, 31], &cfg(13), true, split, 0.0, 3);
        check_batch_norm(&ctx, &[16, 2, 64, 64], &cfg(2), true, split, 1000.0, 4);
        check_batch_norm(&ctx, &[3, 4, 5], &cfg(4), false, split, 0.0, 5);
        check_batch_norm(&ctx, &[1, 4], &cfg(4), false, split, 0.0, 6);
        // S = 36: on CPU adapters the dx pass's runs of 8 quads enter the next channel mid-run.
        check_batch_norm(&ctx, &[4, 3, 36], &cfg(3), true, split, 0.0, 7);
    }
    for width in [1usize, 2, 255, 4096, 4097, 20_000] {
        check_layer_norm(&ctx, &[3, width], &LayerNormConfig::new(&[width]), 0.0, width as u64);
    }
    check_layer_norm(&ctx, &[4, 768], &LayerNormConfig::new(&[768]), 1000.0, 9);
    check_layer_norm(&ctx, &[300, 64], &LayerNormConfig::new(&[64]), 0.0, 10);
}

#[test]
fn batch_norm_backward_workgroup_sums_with_and_without_subgroups() {
    // The shared context sums with subgroup operations where the adapter has SUBGROUP; the
    // second runs the workgroup-memory fallback on the same adapter.
    let shared = gpu!();
    let plain = common::ctx_without(wgpu::Features::SUBGROUP);
    let cfg = BatchNormConfig::new;
    for ctx in [&shared, &plain] {
        for chunk in [256, 4096] {
            let split = ReduceSplit::Workgroup { chunk };
            check_batch_norm(ctx, &[7, 13, 31], &cfg(13), true, split, 0.0, 61);
            check_batch_norm(ctx, &[16, 2, 64, 64], &cfg(2), true, split, 1000.0, 62);
            check_batch_norm(ctx, &[3, 4, 5], &cfg(4), false, split, 0.0, 63);
        }
    }
}

#[test]
fn dropout_backward_regenerates_the_mask() {
    let ctx = gpu!();
    let shape = [3, 5, 7];
    let mut rng = Rng::new(12);
    let dy = rng.normal_vec(105, 0.0, 1.0);
    for (unit, config) in [
        (DropoutUnit::Element, DropoutConfig::new(0.3)),
        (
            DropoutUnit::Element,
            DropoutConfig {
                p: 0.5,
                mode: DropoutMode::ScaleAtInference,
            },
        ),
        (DropoutUnit::Channel, DropoutConfig::new(0.4)),
    ] {
        let mut two_d;
        let mut one_d;
        let d: &mut Dropout = match unit {
            DropoutUnit::Element => {
                one_d = Dropout::with_config(&ctx, config, 77).unwrap();
                &mut one_d
            }
            DropoutUnit::Channel => {
                two_d = Dropout2d::with_config(&ctx, config, 77).unwrap();
                &mut two_d
            }
        };
        d.forward(&upload(&ctx, &rng.normal_vec(105, 0.0, 1.0), &shape))
            .unwrap();
        let (_, mask) = d
            .forward_with_mask(&upload(&ctx, &rng.normal_vec(105, 0.0, 1.0), &shape))
            .unwrap();
        // Backward of the last call (offset 1), three ways.
        let dyt = upload(&ctx, &dy, &shape);
        let regenerated = read(&ctx, &d.backward(&dyt).unwrap());
        let from_mask = read(&ctx, &d.backward_from_mask(&dyt, &mask).unwrap());
        let expected = dropout_backward(&dy, &shape, &config, unit, 77, 1, true).unwrap();
        // One f32 product per element: within half an ulp of the f64 reference.
        assert_close(&format!("{unit:?} {config:?}"), &regenerated, &expected, 1e-7, 0.0);
        assert_eq!(regenerated, from_mask);
        // Accumulation adds dy·m to what dx holds.
        let dx = upload(&ctx, &vec![1.0; 105], &shape);
        d.backward_into(&dyt, &dx, true).unwrap();
        let summed: Vec<f64> = expected.iter().map(|v| v + 1.0).collect();
        assert_close("accumulated", &read(&ctx, &dx), &summed, 1e-7, 1e-7);
        // Eval: identity (inverted) or the eval scale.
        d.eval();
        d.forward(&dyt).unwrap();
        let eval = read(&ctx, &d.backward(&dyt).unwrap());
        let scale = config.scale(false);
        assert_eq!(eval, dy.iter().map(|v| v * scale).collect::<Vec<_>>());
    }
}

#[test]
fn batch_norm_dropout_backward_equals_the_unfused_chain() {
    let ctx = gpu!();
    let mut rng = Rng::new(31);
    // S = 25: Philox groups straddle channels and samples (element-by-element paths);
    // S = 64: every quad lies in one channel and starts a Philox group (vector paths); S = 36:
    // the same, with the dx pass's runs (CPU adapters) entering the next channel mid-run. Both
    // reduce splits (fused and unfused use the same, so their sums agree to rounding).
    let splits = [
        ReduceSplit::Workgroup { chunk: 256 },
        ReduceSplit::Invocation { chunk: 12 },
    ];
    for (split, (shape, training, drop)) in splits.into_iter().flat_map(|s| {
        [
            ([4, 3, 5, 5], true, DropoutConfig::new(0.3)),
            ([2, 3, 8, 8], true, DropoutConfig::new(0.3)),
            ([3, 3, 6, 6], true, DropoutConfig::new(0.3)),
            (
                [4, 3, 5, 5],
                false,
                DropoutConfig {
                    p: 0.4,
                    mode: DropoutMode::ScaleAtInference,
                },
            ),
        ]
        .map(|case| (s, case))
    }) {
        let numel: usize = shape.iter().product();
        let config = BatchNormConfig::new(3);
        let mut fused = BatchNormDropout::new(&ctx, config.clone(), drop, 5).unwrap();
        let mut bn = BatchNorm::with_config(&ctx, config).unwrap();
        fused.batch_norm_mut().set_reduce_split(Some(split));
        bn.set_reduce_split(Some(split));
        let mut dropout = Dropout::with_config(&ctx, drop, 5).unwrap();
        let gamma = [0.5f32, 2.0, -1.5];
        fused.batch_norm_mut().set_weight(&gamma).unwrap();
        bn.set_weight(&gamma).unwrap();
        if !training {
            fused.eval();
            bn.eval();
            dropout.eval();
        }
        let x = upload(&ctx, &rng.normal_vec(numel, 1.0, 2.0), &shape);
        let dy = upload(&ctx, &rng.normal_vec(numel, 0.0, 1.0), &shape);
        fused.forward(&x).unwrap();
        dropout.forward(&bn.forward(&x).unwrap()).unwrap();
        let gf = fused.backward(&dy).unwrap();
        let gu = bn.backward(&dropout.backward(&dy).unwrap()).unwrap();
        let what = format!("{shape:?} training={training} {split:?}");
        assert_close(
            &format!("{what} dx"),
            &read(&ctx, &gf.dx),
            &widen(&read(&ctx, &gu.dx)),
            1e-5,
            1e-6,
        );
        for (a, b) in [(&gf.dweight, &gu.dweight), (&gf.dbias, &gu.dbias)] {
            assert_close(
                &what,
                &read(&ctx, a.as_ref().unwrap()),
                &widen(&read(&ctx, b.as_ref().unwrap())),
                1e-5,
                1e-6,
            );
        }
    }
}

#[test]
fn layer_norm_dropout_backward_equals_the_unfused_chain() {
    let ctx = gpu!();
    let mut rng = Rng::new(41);
    for (width, training) in [(96usize, true), (5000, true), (33, false)] {
        let shape = [3, width];
        let drop = DropoutConfig {
            p: 0.25,
            mode: DropoutMode::ScaleAtInference,
        };
        let config = LayerNormConfig::new(&[width]);
        let mut fused = LayerNormDropout::new(&ctx, config.clone(), drop, 8).unwrap();
        let mut ln = LayerNorm::with_config(&ctx, config).unwrap();
        let mut dropout = Dropout::with_config(&ctx, drop, 8).unwrap();
        if !training {
            fused.eval();
            dropout.eval();
        }
        let x = upload(&ctx, &rng.normal_vec(3 * width, 0.0, 1.0), &shape);
        let dy = upload(&ctx, &rng.normal_vec(3 * width, 0.0, 1.0), &shape);
        fused.forward(&x).unwrap();
        dropout.forward(&ln.forward(&x).unwrap()).unwrap();
        let gf = fused.backward(&dy).unwrap();
        let gu = ln.backward(&dropout.backward(&dy).unwrap()).unwrap();
        let what = format!("width {width} training={training}");
        assert_close(
            &format!("{what} dx"),
            &read(&ctx, &gf.dx),
            &widen(&read(&ctx, &gu.dx)),
            1e-5,
            1e-6,
        );
        for (a, b) in [(&gf.dweight, &gu.dweight), (&gf.dbias, &gu.dbias)] {
            assert_close(
                &what,
                &read(&ctx, a.as_ref().unwrap()),
                &widen(&read(&ctx, b.as_ref().unwrap())),
                1e-5,
                1e-6,
            );
        }
    }
}

#[test]
fn residual_block_backward_equals_the_unfused_chain() {
    let ctx = gpu!();
    let mut rng = Rng::new(51);
    for (width, with_dh) in [(128usize, true), (4500, false), (7, true)] {
        let shape = [4, width];
        let n = 4 * width;
        let drop = DropoutConfig::new(0.2);
        let config = LayerNormConfig::new(&[width]);
        let mut fused = ResidualDropoutLayerNorm::new(&ctx, config.clone(), drop, 3).unwrap();
        let mut ln = LayerNorm::with_config(&ctx, config).unwrap();
        let mut dropout = Dropout::with_config(&ctx, drop, 3).unwrap();
        let (x, residual) = (rng.normal_vec(n, 0.0, 1.0), rng.normal_vec(n, 2.0, 1.0));
        let (dy, dh_in) = (rng.normal_vec(n, 0.0, 1.0), rng.normal_vec(n, 0.0, 0.5));
        let (xt, rt) = (upload(&ctx, &x, &shape), upload(&ctx, &residual, &shape));
        let (dyt, dht) = (upload(&ctx, &dy, &shape), upload(&ctx, &dh_in, &shape));
        fused.forward(&xt, &rt).unwrap();
        let gf = fused.backward(&dyt, with_dh.then_some(&dht)).unwrap();
        // Unfused: h = residual + dropout(x) (add on the host), y = LN(h); dh = LN'(dy) + dh_in.
        let dx_drop = read(&ctx, &dropout.forward(&xt).unwrap());
        let h: Vec<f32> = dx_drop.iter().zip(&residual).map(|(d, r)| r + d).collect();
        ln.forward(&upload(&ctx, &h, &shape)).unwrap();
        let gl = ln.backward(&dyt).unwrap();
        let mut dh = read(&ctx, &gl.dx);
        if with_dh {
            dh.iter_mut().zip(&dh_in).for_each(|(a, b)| *a += b);
        }
        let dx = read(&ctx, &dropout.backward(&upload(&ctx, &dh, &shape)).unwrap());
        let what = format!("width {width} dh_in={with_dh}");
        assert_close(
            &format!("{what} dresidual"),
            &read(&ctx, &gf.dresidual),
            &widen(&dh),
            1e-5,
            1e-6,
        );
        assert_close(&format!("{what} dx"), &read(&ctx, &gf.dx), &widen(&dx), 1e-5, 1e-6);
        let dw = read(&ctx, gf.dweight.as_ref().unwrap());
        assert_close(
            &format!("{what} dweight"),
            &dw,
            &widen(&read(&ctx, gl.dweight.as_ref().unwrap())),
            1e-5,
            1e-6,
        );
    }
}

/// Gradients accumulate when asked: BatchNorm in training and in eval mode (eval writes dx in
/// its reduce pass), with spatial sizes that take the element path (S = 6) and the vector path
/// (S = 8, and 36 where runs of quads enter the next channel mid-run); LayerNorm's parameters
/// without its dx.
#[test]
fn parameter_gradients_accumulate_over_backward_calls() {
    let ctx = gpu!();
    let zeros = |s: &[usize]| Tensor::zeros(&ctx, s, DType::F32).unwrap();
    let mut rng = Rng::new(61);
    for (training, s) in [(true, 6), (false, 6), (true, 8), (false, 8), (true, 36)] {
        let mut bn = BatchNorm::new(&ctx, 3).unwrap();
        bn.set_weight(&[0.5, -1.5, 2.0]).unwrap();
        check_bn_accumulates(
            &ctx,
            &mut bn,
            &format!("BN training={training} S={s}"),
            training,
            s,
            &mut rng,
        );
    }

    let shape = [4, 3, 6];
    let x = upload(&ctx, &rng.normal_vec(72, 0.0, 1.0), &shape);
    let dy = upload(&ctx, &rng.normal_vec(72, 0.0, 1.0), &shape);
    let mut ln = LayerNorm::new(&ctx, &[6]).unwrap();
    ln.forward(&x).unwrap();
    let once = ln.backward(&dy).unwrap();
    let (dx, dw, db) = (zeros(&shape), zeros(&[6]), zeros(&[6]));
    let targets = GradTargets {
        dx: &dx,
        dweight: Some(&dw),
        dbias: Some(&db),
    };
    ln.backward_into(
        &dy,
        targets,
        Accumulate {
            dx: false,
            params: true,
        },
    )
    .unwrap();
    ln.backward_into(
        &dy,
        targets,
        Accumulate {
            dx: false,
            params: true,
        },
    )
    .unwrap();
    let double = |t: &Tensor| widen(&read(&ctx, t)).iter().map(|v| 2.0 * v).collect::<Vec<_>>();
    assert_close(
        "LN dweight x2",
        &read(&ctx, &dw),
        &double(once.dweight.as_ref().unwrap()),
        1e-6,
        1e-6,
    );
    assert_eq!(read(&ctx, &dx), read(&ctx, &once.dx), "dx was not accumulated");
}

/// The fused BatchNorm+dropout backward accumulates like BatchNorm's: three accumulating calls
/// give three times one call's gradients, in training and eval, at S = 6 (quads cross channels:
/// the general dx pass), S = 8 and 36 (the S % 4 == 0 entry points; at 36 a CPU adapter's runs
/// of 8 quads enter the next channel mid-run), and a writing call overwrites.
/// (On a CPU adapter a writing f32 call parks dy·m in dx; an accumulating one cannot, so the
/// masked dx pass itself runs here.)
#[test]
fn batch_norm_dropout_gradients_accumulate_over_backward_calls() {
    let ctx = gpu!();
    let mut rng = Rng::new(67);
    for (training, s) in [(true, 6), (false, 6), (true, 8), (false, 8), (true, 36)] {
        let mut m = BatchNormDropout::new(&ctx, BatchNormConfig::new(3), DropoutConfig::new(0.3), 9).unwrap();
        m.batch_norm_mut().set_weight(&[0.5, -1.5, 2.0]).unwrap();
        let what = format!("BN+dropout training={training} S={s}");
        check_bn_accumulates(&ctx, &mut m, &what, training, s, &mut rng);
    }
}

/// The BatchNorm modules' backward calls, for check_bn_accumulates.
trait BnModule {
    fn run_forward(&mut self, x: &Tensor);
    fn set_eval(&mut self);
    fn run_backward(&mut self, dy: &Tensor) -> Grads;
    fn run_backward_into(&mut self, dy: &Tensor, targets: GradTargets<'_>, accumulate: Accumulate);
}

// The same four calls on both modules (inherent methods of the same names).
macro_rules! bn_module {
    ($($module:ty),*) => {$(
        impl BnModule for $module {
            fn run_forward(&mut self, x: &Tensor) {
                self.forward(x).unwrap();
            }
            fn set_eval(&mut self) {
                self.eval();
            }
            fn run_backward(&mut self, dy: &Tensor) -> Grads {
                self.backward(dy).unwrap()
            }
            fn run_backward_into(&mut self, dy: &Tensor, targets: GradTargets<'_>, accumulate: Accumulate) {
                self.backward_into(dy, targets, accumulate).unwrap();
            }
        }
    )*};
}
bn_module!(BatchNorm, BatchNormDropout);

/// Module `m` (3 channels, affine) on (4, 3, s): after a forward on shifted data (running
/// statistics away from (0, 1), so that eval normalizes differently) and, unless `training`,
/// eval mode, three accumulating backward calls give three times one call's dx, dγ, dβ, and a
/// writing call overwrites them.
fn check_bn_accumulates(ctx: &Context, m: &mut impl BnModule, what: &str, training: bool, s: usize, rng: &mut Rng) {
    let shape = [4, 3, s];
    let n = 12 * s;
    let zeros = |s: &[usize]| Tensor::zeros(ctx, s, DType::F32).unwrap();
    let triple = |t: &Tensor| widen(&read(ctx, t)).iter().map(|v| 3.0 * v).collect::<Vec<_>>();
    let x = upload(ctx, &rng.normal_vec(n, 0.0, 1.0), &shape);
    let dy = upload(ctx, &rng.normal_vec(n, 0.0, 1.0), &shape);
    m.run_forward(&upload(ctx, &rng.normal_vec(n, 2.0, 3.0), &shape));
    if !training {
        m.set_eval();
    }
    m.run_forward(&x);
    let once = m.run_backward(&dy);
    let (dx, dw, db) = (zeros(&shape), zeros(&[3]), zeros(&[3]));
    let targets = GradTargets {
        dx: &dx,
        dweight: Some(&dw),
        dbias: Some(&db),
    };
    for _ in 0..3 {
        m.run_backward_into(&dy, targets, Accumulate { dx: true, params: true });
    }
    assert_close(&format!("{what} dx x3"), &read(ctx, &dx), &triple(&once.dx), 1e-6, 1e-6);
    for (name, got, one) in [("dweight", &dw, &once.dweight), ("dbias", &db, &once.dbias)] {
        assert_close(
            &format!("{what} {name} x3"),
            &read(ctx, got),
            &triple(one.as_ref().unwrap()),
            1e-6,
            1e-6,
        );
    }
    m.run_backward_into(&dy, targets, Accumulate::default());
    assert_eq!(read(ctx, &dx), read(ctx, &once.dx), "{what} dx overwritten");
    assert_eq!(
        read(ctx, &dw),
        read(ctx, once.dweight.as_ref().unwrap()),
        "{what} dγ overwritten"
    );
}

fn state<T: std::fmt::Debug>(e: Result<T, Error>) {
    assert!(matches!(e, Err(Error::State { .. })), "{e:?}");
}

#[test]
fn bad_backward_calls_are_rejected() {
    let ctx = gpu!();
    let shape = [2, 3, 4];
    let x = upload(&ctx, &Rng::new(1).normal_vec(24, 0.0, 1.0), &shape);
    let dy = upload(&ctx, &[1.0; 24], &shape);

    // Backward before any forward.
    state(BatchNorm::new(&ctx, 3).unwrap().backward(&dy));
    state(LayerNorm::new(&ctx, &[4]).unwrap().backward(&dy));
    state(Dropout::new(&ctx, 0.5).unwrap().backward(&dy));
    state(
        LayerNormDropout::new(&ctx, LayerNormConfig::new(&[4]), DropoutConfig::new(0.5), 0)
            .unwrap()
            .backward(&dy),
    );

    // A training-mode backward after an eval forward (no batch statistics saved), and back.
    let mut bn = BatchNorm::new(&ctx, 3).unwrap();
    bn.eval();
    bn.forward(&x).unwrap();
    bn.train();
    let before = read(&ctx, bn.running_mean().unwrap());
    let e = bn.backward(&dy).unwrap_err();
    assert!(
        matches!(e, Error::State { .. }) && e.to_string().contains("eval mode"),
        "{e}"
    );
    assert_eq!(before, read(&ctx, bn.running_mean().unwrap()));
    let mut d = Dropout::new(&ctx, 0.5).unwrap();
    d.forward(&x).unwrap();
    d.eval();
    state(d.backward(&dy));

    // dy of the wrong shape or dtype.
    let mut ln = LayerNorm::new(&ctx, &[4]).unwrap();
    ln.forward(&x).unwrap();
    let wrong = upload(&ctx, &[1.0; 24], &[4, 3, 2]);
    assert!(matches!(ln.backward(&wrong), Err(Error::Shape { .. })));
    assert!(matches!(
        ln.backward(&Tensor::zeros(&ctx, &shape, DType::F16).unwrap()),
        Err(Error::DType { .. })
    ));
    bn.forward(&x).unwrap();
    assert!(matches!(bn.backward(&wrong), Err(Error::Shape { .. })));
    // Gradient targets of the wrong shape.
    let small = Tensor::zeros(&ctx, &[2], DType::F32).unwrap();
    let e = ln.backward_into(
        &dy,
        GradTargets {
            dx: &small,
            dweight: None,
            dbias: None,
        },
        Accumulate::default(),
    );
    assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
    let e = bn.backward_into(
        &dy,
        GradTargets {
            dx: &dy,
            dweight: None,
            dbias: None,
        },
        Accumulate::default(),
    );
    assert!(
        matches!(e, Err(Error::Buffer { what: "dweight", .. })),
        "dx aliasing dy, missing dweight: {e:?}"
    );
    // A mask from another shape.
    let mut other = Dropout::new(&ctx, 0.5).unwrap();
    let (_, mask) = other.forward_with_mask(&upload(&ctx, &[1.0; 10], &[10])).unwrap();
    d.train();
    d.forward(&x).unwrap();
    assert!(matches!(d.backward_from_mask(&dy, &mask), Err(Error::Shape { .. })));
}

#[test]
fn sgd_updates_parameters_and_a_training_loop_lowers_the_loss() {
    let ctx = gpu!();
    // p ← p − lr·g, exactly (one f32 multiply-add per element).
    let p = upload(&ctx, &[1.0, 2.0, 3.0], &[3]);
    normdrop::sgd_step(&ctx, &p, &upload(&ctx, &[0.5, -1.0, 0.0], &[3]), 0.5).unwrap();
    assert_eq!(read(&ctx, &p), vec![0.75, 2.5, 3.0]);
    assert!(matches!(
        normdrop::sgd_step(&ctx, &p, &upload(&ctx, &[1.0; 2], &[2]), 0.1),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        normdrop::sgd_step(&ctx, &p, &upload(&ctx, &[1.0; 3], &[3]), f32::NAN),
        Err(Error::InvalidArgument { .. })
    ));

    // Learn γ = 2, β = 1 for target 2·x̂ + 1 on a fixed batch. Here dL/dγ = γ − 2 and
    // dL/dβ = β − 1 exactly, so lr = 0.5 halves the error each step and quarters the loss.
    let shape = [8, 2, 16];
    let x = Rng::new(71).normal_vec(256, 3.0, 2.0);
    let config = BatchNormConfig {
        track_running_stats: false,
        ..BatchNormConfig::new(2)
    };
    let xhat = batch_norm_forward(&x, &shape, &config, None, None, None, true)
        .unwrap()
        .y;
    let target: Vec<f32> = xhat.iter().map(|v| (2.0 * v + 1.0) as f32).collect();
    let mut bn = BatchNorm::with_config(&ctx, config).unwrap();
    let xt = upload(&ctx, &x, &shape);
    let mut losses = Vec::new();
    for _ in 0..5 {
        let y = read(&ctx, &bn.forward(&xt).unwrap());
        losses.push(y.iter().zip(&target).map(|(y, t)| (y - t) * (y - t)).sum::<f32>() / 256.0);
        let dy: Vec<f32> = y.iter().zip(&target).map(|(y, t)| 2.0 * (y - t) / 256.0).collect();
        let g = bn.backward(&upload(&ctx, &dy, &shape)).unwrap();
        normdrop::sgd_step(&ctx, bn.weight().unwrap(), g.dweight.as_ref().unwrap(), 0.5).unwrap();
        normdrop::sgd_step(&ctx, bn.bias().unwrap(), g.dbias.as_ref().unwrap(), 0.5).unwrap();
    }
    for w in losses.windows(2) {
        assert!(
            (w[1] / w[0] - 0.25).abs() < 1e-3,
            "each step should quarter the loss: {losses:?}"
        );
    }
}
