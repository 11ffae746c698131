//! f16 activations on both storage paths: native `shader-f16` (where the adapter has it) and
//! pairs of halves packed in u32 words (forced with `ContextOptions::force_packed_f16`, and the
//! only path on GL). Every op's GPU result is compared with the f64 CPU reference computed from
//! the same f16 inputs, under the float16 fixtures' tolerance (FORMAT.md's rule with rtol = atol
//! = 4e-3). Shapes are random and include odd element counts, so the last packed word is half
//! used, and odd LayerNorm widths, so neighbouring rows (and workgroups) share packed words.

mod common;

use std::sync::OnceLock;

use common::{assert_close, Rng};
use half::f16;
use normdrop::kernels::Storage;
use normdrop::reference::{self, RefRunningStats};
use normdrop::{
    BatchNorm, BatchNormConfig, BatchNormDropout, Context, ContextOptions, DType, Dropout, Dropout2d, DropoutConfig,
    DropoutUnit, LayerNorm, LayerNormConfig, LayerNormDropout, ResidualDropoutLayerNorm, Tensor,
};
use normdrop_cli::fixture::{self, Fixture, Verdict};

/// The float16 fixtures' tolerance.
const TOL: f64 = 4e-3;

/// The f16 paths this adapter runs: native when it has SHADER_F16, and packed always.
fn paths() -> Vec<(Storage, Context)> {
    let Some(shared) = common::ctx() else {
        return Vec::new();
    };
    static PACKED: OnceLock<Context> = OnceLock::new();
    let packed = PACKED
        .get_or_init(|| {
            Context::with_options_blocking(ContextOptions {
                force_packed_f16: true,
                ..Default::default()
            })
            .expect("the shared context's adapter opens again")
        })
        .clone();
    assert_eq!(packed.storage(DType::F16), Storage::F16Packed);
    let mut out = vec![(Storage::F16Packed, packed)];
    if shared.features().contains(wgpu::Features::SHADER_F16) {
        assert_eq!(shared.storage(DType::F16), Storage::F16);
        out.push((Storage::F16, shared));
    } else {
        // GL (llvmpipe) has no SHADER_F16: there, packed is the f16 path.
        assert_eq!(shared.storage(DType::F16), Storage::F16Packed);
    }
    out
}

/// `n` random values rounded to f16, and the same values exactly in f64.
fn halves(rng: &mut Rng, n: usize, mean: f64, std: f64) -> (Vec<f16>, Vec<f64>) {
    let h: Vec<f16> = (0..n).map(|_| f16::from_f64(mean + std * rng.normal())).collect();
    let w = h.iter().map(|v| f64::from(v.to_f32())).collect();
    (h, w)
}

fn upload(ctx: &Context, h: &[f16], shape: &[usize]) -> Tensor {
    Tensor::from_slice(ctx, h, shape).unwrap()
}

fn read16(ctx: &Context, t: &Tensor) -> Vec<f32> {
    assert_eq!(t.dtype(), DType::F16, "outputs keep the input's dtype");
    t.to_vec_blocking::<f16>(ctx)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect()
}

fn read32(ctx: &Context, t: &Tensor) -> Vec<f32> {
    t.to_vec_blocking::<f32>(ctx).unwrap()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

#[test]
fn float16_fixtures_pass_on_every_path() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/torch");
    for (storage, ctx) in paths() {
        for name in ["bn2d_train_f16", "ln_f16"] {
            let fx = Fixture::load(format!("{dir}/{name}.safetensors")).unwrap();
            assert_eq!(fx.dtype, "float16");
            let lines = fixture::check(&ctx, &fx).unwrap();
            assert!(lines.len() >= 6, "{name}: {} lines", lines.len());
            for line in lines {
                assert!(matches!(line.verdict, Verdict::Pass(_)), "{storage:?}: {line}");
                if let Some(note) = &line.note {
                    let expected = if storage == Storage::F16 { "native" } else { "packed" };
                    assert!(note.contains(expected), "{storage:?}: {line}");
                }
            }
        }
    }
}

#[test]
fn batch_norm_f16_matches_reference_on_random_shapes() {
    let mut rng = Rng::new(1601);
    for (storage, ctx) in paths() {
        for case in 0..5 {
            // Odd sizes: N·C·S is odd in most cases.
            let n = 1 + rng.next_u64() as usize % 4;
            let c = 1 + rng.next_u64() as usize % 6;
            let s = 1 + 2 * (rng.next_u64() as usize % 40);
            let shape = [n + 1, c, s];
            let numel = shape.iter().product::<usize>();
            let what = format!("{storage:?} case {case} {shape:?}");
            let (xh, xw) = halves(&mut rng, numel, 3.0, 2.0);
            let (dyh, dyw) = halves(&mut rng, numel, 0.0, 1.0);
            let gamma: Vec<f32> = (0..c).map(|_| (0.5 + rng.uniform()) as f32).collect();
            let beta: Vec<f32> = (0..c).map(|_| rng.normal() as f32).collect();
            let config = BatchNormConfig::new(c);

            let mut bn = BatchNorm::with_config(&ctx, config.clone()).unwrap();
            bn.set_weight(&gamma).unwrap();
            bn.set_bias(&beta).unwrap();
            let y = bn.forward(&upload(&ctx, &xh, &shape)).unwrap();
            let mut running = RefRunningStats::new(c);
            let r = reference::batch_norm_forward(
                &f32s(&xw),
                &shape,
                &config,
                Some(&gamma),
                Some(&beta),
                Some(&mut running),
                true,
            )
            .unwrap();
            assert_close(&format!("{what} y"), &read16(&ctx, &y), &r.y, TOL, TOL);
            // Statistics are f32 and accumulated in f32: held to f32-grade tolerance.
            let rm = read32(&ctx, bn.running_mean().unwrap());
            assert_close(&format!("{what} running_mean"), &rm, &running.mean, 1e-5, 1e-5);
            let rv = read32(&ctx, bn.running_var().unwrap());
            assert_close(&format!("{what} running_var"), &rv, &running.var, 1e-5, 1e-5);

            let g = bn.backward(&upload(&ctx, &dyh, &shape)).unwrap();
            let w64 = reference::widen(&gamma);
            let rg = reference::batch_norm_backward(&xw, &dyw, &shape, &config, Some(&w64), &r.mean, &r.invstd, true)
                .unwrap();
            assert_close(&format!("{what} dx"), &read16(&ctx, &g.dx), &rg.dx, TOL, TOL);
            let dw = read32(&ctx, g.dweight.as_ref().unwrap());
            assert_close(&format!("{what} dweight"), &dw, &rg.dweight, TOL, TOL);
            let db = read32(&ctx, g.dbias.as_ref().unwrap());
            assert_close(&format!("{what} dbias"), &db, &rg.dbias, TOL, TOL);
        }
    }
}

#[test]
fn layer_norm_f16_matches_reference_on_random_shapes() {
    let mut rng = Rng::new(1602);
    for (storage, ctx) in paths() {
        // Odd widths in both LayerNorm paths (registers up to 4096, re-read beyond).
        let mut widths = vec![1, 3, 7, 33, 255, 769, 4099];
        widths.extend((0..3).map(|_| 1 + 2 * (rng.next_u64() as usize % 600)));
        for (case, &w) in widths.iter().enumerate() {
            let rows = 1 + rng.next_u64() as usize % 9;
            let shape = [rows, w];
            let what = format!("{storage:?} case {case} {shape:?}");
            let (xh, xw) = halves(&mut rng, rows * w, -1.0, 3.0);
            let (dyh, dyw) = halves(&mut rng, rows * w, 0.0, 1.0);
            let gamma: Vec<f32> = (0..w).map(|_| (0.5 + rng.uniform()) as f32).collect();
            let beta: Vec<f32> = (0..w).map(|_| rng.normal() as f32).collect();
            let config = LayerNormConfig::new(&[w]);
            let mut ln = LayerNorm::with_config(&ctx, config.clone()).unwrap();
            ln.set_weight(&gamma).unwrap();
            ln.set_bias(&beta).unwrap();
            let y = ln.forward(&upload(&ctx, &xh, &shape)).unwrap();
            let r = reference::layer_norm_forward(&xw, &shape, &config, Some(&gamma), Some(&beta)).unwrap();
            assert_close(&format!("{what} y"), &read16(&ctx, &y), &r.y, TOL, TOL);
            let saved = ln.saved().unwrap().clone();
            assert_close(&format!("{what} mean"), &read32(&ctx, &saved.mean), &r.mean, 1e-5, 1e-5);

            let g = ln.backward(&upload(&ctx, &dyh, &shape)).unwrap();
            let w64 = reference::widen(&gamma);
            let rg = reference::layer_norm_backward(&xw, &dyw, &shape, &config, Some(&w64), &r.mean, &r.rstd).unwrap();
            assert_close(&format!("{what} dx"), &read16(&ctx, &g.dx), &rg.dx, TOL, TOL);
            let dw = read32(&ctx, g.dweight.as_ref().unwrap());
            assert_close(&format!("{what} dweight"), &dw, &rg.dweight, TOL, TOL);
        }
    }
}

#[test]
fn dropout_f16_keeps_the_exact_mask_and_scales_within_rounding() {
    let mut rng = Rng::new(1603);
    for (storage, ctx) in paths() {
        for (case, n) in [1usize, 3, 5, 1001, 4097, 65537].into_iter().enumerate() {
            let what = format!("{storage:?} case {case} n={n}");
            let config = DropoutConfig::new(0.3);
            let (xh, xw) = halves(&mut rng, n, 1.0, 1.0);
            let mut d = Dropout::with_config(&ctx, config, 42 + case as u64).unwrap();
            let (seed, offset) = d.state();
            let y = read16(&ctx, &d.forward(&upload(&ctx, &xh, &[n])).unwrap());
            let (ry, mask) =
                reference::dropout_forward(&f32s(&xw), &[n], &config, DropoutUnit::Element, seed, offset, true)
                    .unwrap();
            assert_close(&format!("{what} y"), &y, &ry, TOL, TOL);
            for i in 0..n {
                if xw[i] != 0.0 {
                    assert_eq!(
                        y[i] != 0.0,
                        mask[i],
                        "{what}: element {i} kept/dropped differs from the CPU mask"
                    );
                }
            }
            let (dyh, dyw) = halves(&mut rng, n, 0.0, 1.0);
            let dx = read16(&ctx, &d.backward(&upload(&ctx, &dyh, &[n])).unwrap());
            let rdx = reference::dropout_backward(&f32s(&dyw), &[n], &config, DropoutUnit::Element, seed, offset, true)
                .unwrap();
            assert_close(&format!("{what} dx"), &dx, &rdx, TOL, TOL);
            // Accumulating twice into a zeroed gradient gives 2·dy·m.
            let acc = Tensor::zeros(&ctx, &[n], DType::F16).unwrap();
            let dyt = upload(&ctx, &dyh, &[n]);
            d.backward_into(&dyt, &acc, true).unwrap();
            d.backward_into(&dyt, &acc, true).unwrap();
            let twice: Vec<f64> = rdx.iter().map(|v| 2.0 * v).collect();
            assert_close(&format!("{what} accumulated dx"), &read16(&ctx, &acc), &twice, TOL, TOL);
        }
        // Dropout2d with an odd element count.
        let shape = [3, 5, 7];
        let (xh, xw) = halves(&mut rng, 105, 2.0, 0.5);
        let mut d2 = Dropout2d::new(&ctx, 0.5).unwrap();
        let (seed, offset) = d2.state();
        let y = read16(&ctx, &d2.forward(&upload(&ctx, &xh, &shape)).unwrap());
        let (ry, _) = reference::dropout_forward(
            &f32s(&xw),
            &shape,
            &DropoutConfig::new(0.5),
            DropoutUnit::Channel,
            seed,
            offset,
            true,
        )
        .unwrap();
        assert_close(&format!("{storage:?} dropout2d y"), &y, &ry, TOL, TOL);
    }
}

#[test]
fn fused_ops_in_f16_match_their_unfused_references() {
    let mut rng = Rng::new(1604);
    for (storage, ctx) in paths() {
        let drop = DropoutConfig::new(0.25);

        // BatchNorm → dropout, odd element count.
        let shape = [3, 5, 7];
        let (xh, xw) = halves(&mut rng, 105, 0.5, 2.0);
        let mut m = BatchNormDropout::new(&ctx, BatchNormConfig::new(5), drop, 7).unwrap();
        let (seed, offset) = m.state();
        let y = read16(&ctx, &m.forward(&upload(&ctx, &xh, &shape)).unwrap());
        let mut running = RefRunningStats::new(5);
        let bn = reference::batch_norm_forward(
            &f32s(&xw),
            &shape,
            &BatchNormConfig::new(5),
            None,
            None,
            Some(&mut running),
            true,
        )
        .unwrap();
        let (ry, _) =
            reference::dropout_forward(&f32s(&bn.y), &shape, &drop, DropoutUnit::Element, seed, offset, true).unwrap();
        assert_close(&format!("{storage:?} bn+dropout y"), &y, &ry, TOL, TOL);

        // LayerNorm → dropout with an odd width.
        let shape = [5, 77];
        let (xh, xw) = halves(&mut rng, 385, 0.0, 1.0);
        let config = LayerNormConfig::new(&[77]);
        let mut m = LayerNormDropout::new(&ctx, config.clone(), drop, 9).unwrap();
        let (seed, offset) = m.state();
        let y = read16(&ctx, &m.forward(&upload(&ctx, &xh, &shape)).unwrap());
        let ln = reference::layer_norm_forward(&xw, &shape, &config, None, None).unwrap();
        let (ry, _) =
            reference::dropout_forward(&f32s(&ln.y), &shape, &drop, DropoutUnit::Element, seed, offset, true).unwrap();
        assert_close(&format!("{storage:?} ln+dropout y"), &y, &ry, TOL, TOL);

        // residual + dropout → LayerNorm: h is stored in f16, and LN normalizes that stored h.
        let (rh, _) = halves(&mut rng, 385, 1.0, 1.0);
        let mut m = ResidualDropoutLayerNorm::new(&ctx, config.clone(), drop, 11).unwrap();
        let (seed, offset) = m.state();
        let (y, h) = m
            .forward(&upload(&ctx, &xh, &shape), &upload(&ctx, &rh, &shape))
            .unwrap();
        let (dropped, _) =
            reference::dropout_forward(&f32s(&xw), &shape, &drop, DropoutUnit::Element, seed, offset, true).unwrap();
        let rh_exact: Vec<f64> = rh
            .iter()
            .zip(&dropped)
            .map(|(r, d)| f64::from(r.to_f32()) + d)
            .collect();
        let h = read16(&ctx, &h);
        assert_close(&format!("{storage:?} residual h"), &h, &rh_exact, TOL, TOL);
        // LayerNorm of the h the kernel stored (what PyTorch's f16 chain normalizes).
        let stored: Vec<f64> = h.iter().map(|&v| f64::from(v)).collect();
        let ry = reference::layer_norm_forward(&stored, &shape, &config, None, None).unwrap();
        assert_close(&format!("{storage:?} residual y"), &read16(&ctx, &y), &ry.y, TOL, TOL);
        let dy = upload(&ctx, &halves(&mut rng, 385, 0.0, 1.0).0, &shape);
        let g = m.backward(&dy, None).unwrap();
        assert_eq!(g.dx.dtype(), DType::F16);
        assert_eq!(g.dresidual.dtype(), DType::F16);
        assert!(read16(&ctx, &g.dresidual).iter().all(|v| v.is_finite()));
    }
}

/// The fused BatchNorm+dropout backward in f16 against the reference BatchNorm backward of
/// dy·m (the forward's mask regenerated on the CPU): S = 8 and 36 take the dx pass's S % 4 == 0
/// entry points (at 36 with runs entering the next channel mid-run on CPU adapters), S = 7 the
/// general walk, in training (batch statistics). f16 dx is never parked in
/// dx, so the mask is drawn in the dx pass itself here, on every adapter.
#[test]
fn batch_norm_dropout_backward_f16_matches_reference() {
    let mut rng = Rng::new(1610);
    for (storage, ctx) in paths() {
        for shape in [[2, 3, 8], [2, 3, 36], [3, 3, 7]] {
            let numel: usize = shape.iter().product();
            let what = format!("{storage:?} {shape:?} bn+dropout backward");
            let config = BatchNormConfig::new(3);
            let drop = DropoutConfig::new(0.25);
            let gamma = [0.5f32, -1.5, 2.0];
            let (xh, xw) = halves(&mut rng, numel, 0.5, 2.0);
            let (dyh, dyw) = halves(&mut rng, numel, 0.0, 1.0);
            let mut m = BatchNormDropout::new(&ctx, config.clone(), drop, 13).unwrap();
            m.batch_norm_mut().set_weight(&gamma).unwrap();
            let (seed, offset) = m.state();
            m.forward(&upload(&ctx, &xh, &shape)).unwrap();
            let g = m.backward(&upload(&ctx, &dyh, &shape)).unwrap();
            let gamma = reference::widen(&gamma);
            let mut running = RefRunningStats::new(3);
            let fwd = reference::batch_norm_forward(
                &f32s(&xw),
                &shape,
                &config,
                Some(&f32s(&gamma)),
                None,
                Some(&mut running),
                true,
            )
            .unwrap();
            let dym = reference::dropout_backward(&f32s(&dyw), &shape, &drop, DropoutUnit::Element, seed, offset, true)
                .unwrap();
            let r =
                reference::batch_norm_backward(&xw, &dym, &shape, &config, Some(&gamma), &fwd.mean, &fwd.invstd, true)
                    .unwrap();
            assert_close(&format!("{what} dx"), &read16(&ctx, &g.dx), &r.dx, TOL, TOL);
            assert_close(
                &format!("{what} dweight"),
                &read32(&ctx, g.dweight.as_ref().unwrap()),
                &r.dweight,
                TOL,
                TOL,
            );
        }
    }
}

#[test]
fn native_f16_is_refused_where_the_device_lacks_it() {
    let Some(ctx) = common::ctx() else { return };
    let native = ctx.kernel_with::<normdrop::LayerNormKernel>(Storage::F16);
    let direct = normdrop::LayerNormKernel::with_storage(ctx.device(), Storage::F16);
    if ctx.features().contains(wgpu::Features::SHADER_F16) {
        assert_eq!(native.unwrap().storage(), Storage::F16);
        assert_eq!(direct.unwrap().storage(), Storage::F16);
    } else {
        for e in [native.map(|_| ()).unwrap_err(), direct.map(|_| ()).unwrap_err()] {
            assert!(matches!(e, normdrop::Error::Unsupported { .. }), "{e}");
            assert!(e.to_string().contains("SHADER_F16"), "{e}");
        }
    }
    // The packed path is available everywhere.
    let packed = ctx
        .kernel_with::<normdrop::LayerNormKernel>(Storage::F16Packed)
        .unwrap();
    assert_eq!(packed.storage(), Storage::F16Packed);
}
