//! Tensors larger than one storage binding: a context created with a deliberately small
//! `max_storage_buffer_binding_size` (64 KiB) makes modest tensors span several bindings, so
//! every op runs in binding ranges. Results must equal the single-binding CPU reference: BatchNorm with each
//! channel split across binding ranges (statistics merged over every binding range), LayerNorm by row ranges,
//! and dropout with exactly the single-binding mask.

mod common;
#[path = "common/ln_case.rs"]
mod ln_case;

use std::sync::OnceLock;

use common::{assert_close, Rng};
use half::f16;
use ln_case::LanesCase;
use normdrop::kernels::Storage;
use normdrop::reference::{self, RefRunningStats};
use normdrop::tuning::ReduceSplit;
use normdrop::{
    BatchNorm, BatchNormBackwardKernel, BatchNormConfig, BatchNormDropout, BatchNormKernel, Context, ContextOptions,
    DType, Dropout, Dropout2d, DropoutConfig, DropoutKernel, DropoutUnit, LayerNorm, LayerNormBackwardKernel,
    LayerNormConfig, LayerNormDropout, LayerNormFusion, LayerNormKernel, ResidualDropoutLayerNorm, Tensor,
};

const LIMIT: u64 = 64 << 10;

/// A context on the shared adapter whose storage bindings stop at 64 KiB, once with f32/native
/// kernels and once forcing packed f16.
fn small(packed: bool) -> Option<Context> {
    let shared = common::ctx()?;
    static CTX: OnceLock<[Context; 2]> = OnceLock::new();
    let make = |force_packed_f16| {
        let ctx = Context::with_options_blocking(ContextOptions {
            limits: Some(wgpu::Limits {
                max_storage_buffer_binding_size: LIMIT,
                ..shared.limits()
            }),
            force_packed_f16,
            ..Default::default()
        })
        .expect("the shared adapter opens with lower limits");
        assert_eq!(ctx.limits().max_storage_buffer_binding_size, LIMIT);
        ctx
    };
    Some(CTX.get_or_init(|| [make(false), make(true)])[usize::from(packed)].clone())
}

fn read(ctx: &Context, t: &Tensor) -> Vec<f32> {
    match t.dtype() {
        DType::F32 => t.to_vec_blocking::<f32>(ctx).unwrap(),
        DType::F16 => t
            .to_vec_blocking::<f16>(ctx)
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect(),
    }
}

#[test]
fn dropout_across_bindings_draws_exactly_the_single_binding_mask() {
    let Some(ctx) = small(false) else { return };
    let n = 50_003; // 200 KB of f32: 4 bindings
    let config = DropoutConfig::new(0.4);
    let plan = ctx
        .kernel::<DropoutKernel>()
        .unwrap()
        .plan(ctx.device(), &[n], &config, DropoutUnit::Element)
        .unwrap();
    assert!(plan.ranges() >= 4, "{} binding ranges", plan.ranges());

    let x = Rng::new(3).normal_vec(n, 0.0, 1.0);
    let mut d = Dropout::with_config(&ctx, config, 1234).unwrap();
    d.set_state(1234, 77);
    let y = read(&ctx, &d.forward(&Tensor::from_slice(&ctx, &x, &[n]).unwrap()).unwrap());
    let mask = normdrop::rng::mask(1234, 77, n, config.rule().unwrap());
    let scale = config.scale(true);
    for i in 0..n {
        // x·m, as PyTorch computes it: a dropped negative value gives −0.
        let expected = x[i] * if mask[i] { scale } else { 0.0 };
        assert_eq!(y[i].to_bits(), expected.to_bits(), "element {i}");
    }
    // Backward (regenerated mask) and from the stored mask, also split.
    let dy = Rng::new(4).normal_vec(n, 0.0, 1.0);
    let dy = Tensor::from_slice(&ctx, &dy, &[n]).unwrap();
    let dx = read(&ctx, &d.backward(&dy).unwrap());
    let (_, m) = d
        .forward_with_mask(&Tensor::from_slice(&ctx, &x, &[n]).unwrap())
        .unwrap();
    let dx_mask = read(&ctx, &d.backward_from_mask(&dy, &m).unwrap());
    let dyv = read(&ctx, &dy);
    for i in 0..n {
        let expected = dyv[i] * if mask[i] { scale } else { 0.0 };
        assert_eq!(dx[i].to_bits(), expected.to_bits(), "dx element {i}");
    }
    let mask2 = normdrop::rng::mask(1234, 78, n, config.rule().unwrap());
    for i in 0..n {
        let expected = dyv[i] * if mask2[i] { scale } else { 0.0 };
        assert_eq!(dx_mask[i].to_bits(), expected.to_bits(), "dx from mask, element {i}");
    }

    // Dropout2d over (N, C, S) with channels crossing binding range boundaries.
    let shape = [7, 9, 333];
    let numel = 7 * 9 * 333;
    let x = Rng::new(5).normal_vec(numel, 1.0, 1.0);
    let mut d2 = Dropout2d::new(&ctx, 0.5).unwrap();
    let (seed, offset) = d2.state();
    let y = read(
        &ctx,
        &d2.forward(&Tensor::from_slice(&ctx, &x, &shape).unwrap()).unwrap(),
    );
    let (ry, _) = reference::dropout_forward(
        &x,
        &shape,
        &DropoutConfig::new(0.5),
        DropoutUnit::Channel,
        seed,
        offset,
        true,
    )
    .unwrap();
    for i in 0..numel {
        assert_eq!(f64::from(y[i]), ry[i], "Dropout2d element {i}");
    }
}

#[test]
fn packed_f16_dropout_across_bindings_keeps_the_mask() {
    let Some(ctx) = small(true) else { return };
    let n = 100_001; // odd; 200 KB of halves
    let plan = ctx
        .kernel_with::<DropoutKernel>(Storage::F16Packed)
        .unwrap()
        .plan(ctx.device(), &[n], &DropoutConfig::new(0.5), DropoutUnit::Element)
        .unwrap();
    assert!(plan.ranges() >= 4, "{} binding ranges", plan.ranges());
    let x: Vec<f16> = (0..n).map(|i| f16::from_f32(1.0 + (i % 7) as f32)).collect();
    let mut d = Dropout::new(&ctx, 0.5).unwrap();
    let y = read(&ctx, &d.forward(&Tensor::from_slice(&ctx, &x, &[n]).unwrap()).unwrap());
    let mask = normdrop::rng::mask(0, 0, n, DropoutConfig::new(0.5).rule().unwrap());
    for i in 0..n {
        let expected = x[i].to_f32() * if mask[i] { 2.0 } else { 0.0 };
        assert_eq!(y[i], expected, "element {i}");
    }
}

#[test]
fn layer_norm_in_row_ranges_matches_the_reference() {
    for packed in [false, true] {
        let Some(ctx) = small(packed) else { return };
        let dtype = if packed { DType::F16 } else { DType::F32 };
        let tol = if packed { 4e-3 } else { 1e-4 };
        let (rows, w) = (400, 101); // 162 KB of f32, 81 KB of f16
        let shape = [rows, w];
        let config = LayerNormConfig::new(&[w]);
        let storage = ctx.storage(dtype);
        let fwd = ctx
            .kernel_with::<LayerNormKernel>(storage)
            .unwrap()
            .plan(ctx.device(), &shape, &config, LayerNormFusion::None)
            .unwrap();
        let bwd = ctx
            .kernel_with::<LayerNormBackwardKernel>(storage)
            .unwrap()
            .plan(ctx.device(), &shape, &config, LayerNormFusion::None, true)
            .unwrap();
        assert!(
            fwd.ranges() >= 2 && bwd.ranges() >= 2,
            "{} / {}",
            fwd.ranges(),
            bwd.ranges()
        );

        let mut rng = Rng::new(6);
        let (x, xw) = values(&mut rng, rows * w, 2.0, 3.0, dtype);
        let (dy, dyw) = values(&mut rng, rows * w, 0.0, 1.0, dtype);
        let gamma: Vec<f32> = (0..w).map(|j| 0.5 + j as f32 / w as f32).collect();
        let mut ln = LayerNorm::with_config(&ctx, config.clone()).unwrap();
        ln.set_weight(&gamma).unwrap();
        let y = ln.forward(&upload(&ctx, &x, &shape, dtype)).unwrap();
        let r = reference::layer_norm_forward(&xw, &shape, &config, Some(&gamma), None).unwrap();
        assert_close("split LN y", &read(&ctx, &y), &r.y, tol, tol);
        let saved = ln.saved().unwrap().clone();
        assert_close("split LN rstd", &read(&ctx, &saved.rstd), &r.rstd, 1e-4, 1e-4);
        let g = ln.backward(&upload(&ctx, &dy, &shape, dtype)).unwrap();
        let w64 = reference::widen(&gamma);
        let rg = reference::layer_norm_backward(&xw, &dyw, &shape, &config, Some(&w64), &r.mean, &r.rstd).unwrap();
        assert_close("split LN dx", &read(&ctx, &g.dx), &rg.dx, tol, tol);
        assert_close(
            "split LN dγ",
            &read(&ctx, g.dweight.as_ref().unwrap()),
            &rg.dweight,
            tol,
            tol,
        );
        assert_close(
            "split LN dβ",
            &read(&ctx, g.dbias.as_ref().unwrap()),
            &rg.dbias,
            tol,
            tol,
        );

        // Fused LayerNorm → dropout: the mask over global indices, unchanged by splitting.
        let drop = DropoutConfig::new(0.3);
        let mut m = LayerNormDropout::new(&ctx, config.clone(), drop, 5).unwrap();
        let (seed, offset) = m.state();
        let y = read(&ctx, &m.forward(&upload(&ctx, &x, &shape, dtype)).unwrap());
        let r = reference::layer_norm_forward(&xw, &shape, &config, None, None).unwrap();
        let ry_f32: Vec<f32> = r.y.iter().map(|&v| v as f32).collect();
        let (ry, mask) =
            reference::dropout_forward(&ry_f32, &shape, &drop, DropoutUnit::Element, seed, offset, true).unwrap();
        assert_close("split LN+dropout y", &y, &ry, tol, tol);
        for (i, &keep) in mask.iter().enumerate() {
            if r.y[i].abs() > 1e-2 {
                assert_eq!(y[i] != 0.0, keep, "LN+dropout element {i}");
            }
        }

        // Residual block: h = residual + dropout(x), split alongside.
        let (res, resw) = values(&mut rng, rows * w, 0.0, 1.0, dtype);
        let mut block = ResidualDropoutLayerNorm::new(&ctx, config.clone(), drop, 8).unwrap();
        let (seed, offset) = block.state();
        let (_, h) = block
            .forward(&upload(&ctx, &x, &shape, dtype), &upload(&ctx, &res, &shape, dtype))
            .unwrap();
        let xf: Vec<f32> = xw.iter().map(|&v| v as f32).collect();
        let (dropped, _) =
            reference::dropout_forward(&xf, &shape, &drop, DropoutUnit::Element, seed, offset, true).unwrap();
        let rh: Vec<f64> = resw.iter().zip(&dropped).map(|(a, b)| a + b).collect();
        assert_close("split residual h", &read(&ctx, &h), &rh, tol, tol);
    }
}

/// Both LayerNorm geometries in row binding ranges, forward and backward, each fusion: the row-block
/// path (one lane per row; in the backward dx and the dγ/dβ partials in one pass) and lane
/// segments (eight lanes, the backward's separate partial pass), on rows of whole quads (the
/// vec4 variant) and not. The mask is indexed globally across binding ranges, and each binding range's partials
/// land at its own blocks.
#[test]
fn layer_norm_geometries_in_row_ranges_match_the_reference() {
    let Some(ctx) = small(false) else { return };
    let mut rng = Rng::new(9);
    // 128: rows of 512 bytes, so every binding range binds as vectors and one lane per row takes the
    // row-per-subgroup forward where the device has it (binding ranges at row_base > 0).
    for width in [100, 101, 128] {
        let case = LanesCase::new(&mut rng, 300, width);
        for lanes in [1, 8] {
            for fusion in [
                LayerNormFusion::None,
                LayerNormFusion::Dropout(DropoutConfig::new(0.5)),
                LayerNormFusion::ResidualDropout(DropoutConfig::new(0.5)),
            ] {
                let ranges = case.check(&ctx, lanes, fusion);
                assert!(ranges >= 2, "300x{width}, lanes {lanes}: {ranges} binding range(s)");
            }
        }
    }
}

#[test]
fn batch_norm_splits_channels_across_binding_ranges_and_matches_the_reference() {
    let splits = [
        ReduceSplit::Workgroup { chunk: 256 },
        ReduceSplit::Invocation { chunk: 64 },
    ];
    for (packed, split) in [false, true].into_iter().flat_map(|p| splits.map(|s| (p, s))) {
        let Some(ctx) = small(packed) else { return };
        let dtype = if packed { DType::F16 } else { DType::F32 };
        let tol = if packed { 4e-3 } else { 1e-4 };
        // 80 samples of 3·175 values (168 KB of f32): an odd sample size, so ranges start at
        // multiples of several samples (aligned offsets, whole Philox groups of 4).
        let shape = [80, 3, 175];
        let numel = 80 * 3 * 175;
        let config = BatchNormConfig::new(3);
        let storage = ctx.storage(dtype);
        let fwd = ctx
            .kernel_with::<BatchNormKernel>(storage)
            .unwrap()
            .plan(ctx.device(), &shape, &config)
            .unwrap();
        let bwd = ctx
            .kernel_with::<BatchNormBackwardKernel>(storage)
            .unwrap()
            .plan(ctx.device(), &shape, &config, None)
            .unwrap();
        assert!(
            fwd.ranges() >= 2 && bwd.ranges() >= 2,
            "{} / {}",
            fwd.ranges(),
            bwd.ranges()
        );

        let mut rng = Rng::new(7);
        // Off-centre data: the shift K must be shared by every binding range.
        let (x, xw) = values(&mut rng, numel, 100.0, 0.5, dtype);
        let (dy, dyw) = values(&mut rng, numel, 0.0, 1.0, dtype);
        let gamma = [0.5f32, 1.0, 2.0];
        let beta = [0.1f32, -0.2, 0.3];
        let mut bn = BatchNorm::with_config(&ctx, config.clone()).unwrap();
        bn.set_reduce_split(Some(split));
        bn.set_weight(&gamma).unwrap();
        bn.set_bias(&beta).unwrap();
        let y = bn.forward(&upload(&ctx, &x, &shape, dtype)).unwrap();
        let mut running = RefRunningStats::new(3);
        let xf: Vec<f32> = xw.iter().map(|&v| v as f32).collect();
        let r = reference::batch_norm_forward(
            &xf,
            &shape,
            &config,
            Some(&gamma),
            Some(&beta),
            Some(&mut running),
            true,
        )
        .unwrap();
        assert_close("split BN y", &read(&ctx, &y), &r.y, tol, tol);
        let saved = bn.saved().unwrap().clone();
        assert_close("split BN mean", &read(&ctx, &saved.mean), &r.mean, 1e-6, 1e-6);
        assert_close("split BN invstd", &read(&ctx, &saved.invstd), &r.invstd, 1e-4, 1e-4);
        assert_close(
            "split BN running_mean",
            &read(&ctx, bn.running_mean().unwrap()),
            &running.mean,
            1e-6,
            1e-6,
        );
        assert_close(
            "split BN running_var",
            &read(&ctx, bn.running_var().unwrap()),
            &running.var,
            1e-4,
            1e-4,
        );
        // One call, one count, however many ranges ran the stats pass.
        assert_eq!(bn.num_batches_tracked_blocking().unwrap(), Some(1), "split BN count");

        // The backward's gradients against the reference's, with the statistics the forward
        // normalized with (batch statistics in training, running ones in eval).
        let w64 = reference::widen(&gamma);
        let check_backward = |bn: &mut BatchNorm, what: &str, mean: &[f64], invstd: &[f64], training: bool| {
            let g = bn.backward(&upload(&ctx, &dy, &shape, dtype)).unwrap();
            let rg =
                reference::batch_norm_backward(&xw, &dyw, &shape, &config, Some(&w64), mean, invstd, training).unwrap();
            assert_close(&format!("{what} dx"), &read(&ctx, &g.dx), &rg.dx, tol, tol);
            let dw = read(&ctx, g.dweight.as_ref().unwrap());
            assert_close(&format!("{what} dγ"), &dw, &rg.dweight, tol, tol);
            let db = read(&ctx, g.dbias.as_ref().unwrap());
            assert_close(&format!("{what} dβ"), &db, &rg.dbias, tol, tol);
        };
        check_backward(&mut bn, "split BN", &r.mean, &r.invstd, true);

        // Eval: running statistics, dx written by each range's reduce.
        bn.eval();
        bn.forward(&upload(&ctx, &x, &shape, dtype)).unwrap();
        let re = reference::batch_norm_forward(
            &xf,
            &shape,
            &config,
            Some(&gamma),
            Some(&beta),
            Some(&mut running),
            false,
        )
        .unwrap();
        check_backward(&mut bn, "split eval BN", &re.mean, &re.invstd, false);

        // Fused BatchNorm → dropout: the single-binding mask over flat indices.
        let drop = DropoutConfig::new(0.2);
        let mut m = BatchNormDropout::new(&ctx, config.clone(), drop, 3).unwrap();
        m.batch_norm_mut().set_reduce_split(Some(split));
        let (seed, offset) = m.state();
        let y = read(&ctx, &m.forward(&upload(&ctx, &x, &shape, dtype)).unwrap());
        let mut running = RefRunningStats::new(3);
        let r = reference::batch_norm_forward(&xf, &shape, &config, None, None, Some(&mut running), true).unwrap();
        let ry_f32: Vec<f32> = r.y.iter().map(|&v| v as f32).collect();
        let (ry, mask) =
            reference::dropout_forward(&ry_f32, &shape, &drop, DropoutUnit::Element, seed, offset, true).unwrap();
        assert_close("split BN+dropout y", &y, &ry, tol, tol);
        for (i, &keep) in mask.iter().enumerate() {
            if r.y[i].abs() > 1e-2 {
                assert_eq!(y[i] != 0.0, keep, "BN+dropout element {i}");
            }
        }
    }
}

#[test]
fn a_single_row_or_sample_beyond_one_binding_is_refused_naming_the_limit() {
    let Some(ctx) = small(false) else { return };
    // One LayerNorm row of 17000 f32 = 68 KB cannot be split.
    let e = ctx
        .kernel::<LayerNormKernel>()
        .unwrap()
        .plan(
            ctx.device(),
            &[2, 17000],
            &LayerNormConfig::new(&[17000]),
            LayerNormFusion::None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("max_storage_buffer_binding_size"), "{e}");
    // One BatchNorm sample of 2·8193 f32 = 65.5 KB.
    let e = ctx
        .kernel::<BatchNormKernel>()
        .unwrap()
        .plan(ctx.device(), &[2, 2, 8193], &BatchNormConfig::new(2))
        .unwrap_err();
    assert!(e.to_string().contains("max_storage_buffer_binding_size"), "{e}");
}

/// `n` random values in `dtype` (rounded to f16 for F16), and the same values in f64.
fn values(rng: &mut Rng, n: usize, mean: f64, std: f64, dtype: DType) -> (Vec<f32>, Vec<f64>) {
    let v: Vec<f32> = rng
        .normal_vec(n, mean, std)
        .into_iter()
        .map(|x| match dtype {
            DType::F32 => x,
            DType::F16 => f16::from_f32(x).to_f32(),
        })
        .collect();
    let w = v.iter().map(|&x| f64::from(x)).collect();
    (v, w)
}

/// Uploads f32 values as a tensor of `dtype` (exact: F16 values were rounded by [`values`]).
fn upload(ctx: &Context, v: &[f32], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_f32(ctx, v, shape, dtype).unwrap()
}
