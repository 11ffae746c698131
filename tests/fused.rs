//! Every fused norm+dropout op equals the unfused composition with the same seed and offset:
//! the mask is identical and the values agree within f32 rounding.

mod common;

use common::{assert_close, Rng};
use normdrop::{
    BatchNorm, BatchNormConfig, BatchNormDropout, Context, Dropout, DropoutConfig, DropoutMode, LayerNorm,
    LayerNormConfig, LayerNormDropout, ResidualDropoutLayerNorm, Tensor,
};

/// f32 rounding: the fused kernel may contract a multiply-add the unfused chain rounds twice.
const ROUNDING: f64 = 1e-6;

fn read(ctx: &Context, t: &Tensor) -> Vec<f32> {
    t.to_vec_blocking(ctx).unwrap()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x.into()).collect()
}

fn modes() -> [DropoutConfig; 3] {
    [
        DropoutConfig::new(0.3),
        DropoutConfig {
            p: 0.6,
            mode: DropoutMode::ScaleAtInference,
        },
        DropoutConfig::new(1.0),
    ]
}

#[test]
fn batch_norm_dropout_equals_batch_norm_then_dropout() {
    let ctx = gpu!();
    let shape = [4, 3, 7, 5];
    let gamma = [0.5f32, 2.0, -1.0];
    let beta = [0.1f32, -0.2, 0.3];
    for (i, drop) in modes().into_iter().enumerate() {
        let bn_config = BatchNormConfig {
            momentum: if i == 1 { None } else { Some(0.1) },
            ..BatchNormConfig::new(3)
        };
        let seed = 1000 + i as u64;
        let mut fused = BatchNormDropout::new(&ctx, bn_config.clone(), drop, seed).unwrap();
        let mut bn = BatchNorm::with_config(&ctx, bn_config).unwrap();
        let mut dropout = Dropout::with_config(&ctx, drop, seed).unwrap();
        for m in [fused.batch_norm_mut(), &mut bn] {
            m.set_weight(&gamma).unwrap();
            m.set_bias(&beta).unwrap();
        }
        let mut rng = Rng::new(seed);
        for step in 0..3 {
            let training = step < 2;
            if !training {
                fused.eval();
                bn.eval();
                dropout.eval();
            }
            let x = Tensor::from_slice(&ctx, &rng.normal_vec(420, 2.0, 3.0), &shape).unwrap();
            let (yf, mf) = fused.forward_with_mask(&x).unwrap();
            let (yu, mu) = dropout.forward_with_mask(&bn.forward(&x).unwrap()).unwrap();
            let what = format!("{drop:?} step {step}");
            assert_eq!(
                mf.to_bools_blocking(&ctx).unwrap(),
                mu.to_bools_blocking(&ctx).unwrap(),
                "{what}: mask"
            );
            assert_close(&what, &read(&ctx, &yf), &f64s(&read(&ctx, &yu)), ROUNDING, ROUNDING);
            assert_eq!(fused.state(), dropout.state(), "{what}: generator");
        }
        // The BatchNorm half is untouched by the fusion: identical running statistics.
        let stats = |b: &BatchNorm| {
            (
                read(&ctx, b.running_mean().unwrap()),
                read(&ctx, b.running_var().unwrap()),
            )
        };
        assert_eq!(stats(fused.batch_norm()), stats(&bn));
        assert_eq!(fused.batch_norm().num_batches_tracked_blocking().unwrap(), Some(2));
    }
}

#[test]
fn layer_norm_dropout_equals_layer_norm_then_dropout() {
    let ctx = gpu!();
    // An on-chip width, an odd one, and one over the on-chip limit.
    for (width, drop) in [
        (768usize, modes()[0]),
        (1001, modes()[1]),
        (5000, modes()[0]),
        (64, modes()[2]),
    ] {
        let config = LayerNormConfig::new(&[width]);
        let mut rng = Rng::new(width as u64);
        let gamma = rng.normal_vec(width, 1.0, 0.3);
        let mut fused = LayerNormDropout::new(&ctx, config.clone(), drop, 42).unwrap();
        let mut ln = LayerNorm::with_config(&ctx, config).unwrap();
        let mut dropout = Dropout::with_config(&ctx, drop, 42).unwrap();
        fused.layer_norm_mut().set_weight(&gamma).unwrap();
        ln.set_weight(&gamma).unwrap();
        for step in 0..3 {
            if step == 2 {
                fused.eval();
                dropout.eval();
            }
            let x = Tensor::from_slice(&ctx, &rng.normal_vec(6 * width, 1.0, 2.0), &[2, 3, width]).unwrap();
            let (yf, mf) = fused.forward_with_mask(&x).unwrap();
            let (yu, mu) = dropout.forward_with_mask(&ln.forward(&x).unwrap()).unwrap();
            let what = format!("width {width} {drop:?} step {step}");
            assert_eq!(
                mf.to_bools_blocking(&ctx).unwrap(),
                mu.to_bools_blocking(&ctx).unwrap(),
                "{what}: mask"
            );
            assert_close(&what, &read(&ctx, &yf), &f64s(&read(&ctx, &yu)), ROUNDING, ROUNDING);
            let saved = (fused.layer_norm().saved().unwrap(), ln.saved().unwrap());
            assert_eq!(
                read(&ctx, &saved.0.mean),
                read(&ctx, &saved.1.mean),
                "{what}: saved mean"
            );
            assert_eq!(
                read(&ctx, &saved.0.rstd),
                read(&ctx, &saved.1.rstd),
                "{what}: saved rstd"
            );
        }
        assert_eq!(fused.state(), (42, 2));
    }
}

#[test]
fn residual_dropout_layer_norm_equals_the_unfused_block() {
    let ctx = gpu!();
    for (width, drop) in [
        (512usize, modes()[0]),
        (33, modes()[1]),
        (4500, modes()[0]),
        (100, modes()[2]),
    ] {
        let shape = [3, width];
        let config = LayerNormConfig::new(&[width]);
        let mut rng = Rng::new(7 + width as u64);
        let mut fused = ResidualDropoutLayerNorm::new(&ctx, config.clone(), drop, 9).unwrap();
        let mut ln = LayerNorm::with_config(&ctx, config).unwrap();
        let mut dropout = Dropout::with_config(&ctx, drop, 9).unwrap();
        let beta = rng.normal_vec(width, 0.0, 0.5);
        fused.layer_norm_mut().set_bias(&beta).unwrap();
        ln.set_bias(&beta).unwrap();
        for step in 0..3 {
            if step == 2 {
                fused.eval();
                dropout.eval();
            }
            let x = rng.normal_vec(3 * width, 0.0, 1.0);
            let residual = rng.normal_vec(3 * width, 5.0, 2.0);
            let (xt, rt) = (
                Tensor::from_slice(&ctx, &x, &shape).unwrap(),
                Tensor::from_slice(&ctx, &residual, &shape).unwrap(),
            );
            let (yf, hf, mf) = fused.forward_with_mask(&xt, &rt).unwrap();
            // Unfused: h = residual + dropout(x) (the add on the host, in f32), y = LayerNorm(h).
            let (dx, mu) = dropout.forward_with_mask(&xt).unwrap();
            let h: Vec<f32> = read(&ctx, &dx).iter().zip(&residual).map(|(d, r)| r + d).collect();
            let yu = ln.forward(&Tensor::from_slice(&ctx, &h, &shape).unwrap()).unwrap();
            let what = format!("width {width} {drop:?} step {step}");
            assert_eq!(
                mf.to_bools_blocking(&ctx).unwrap(),
                mu.to_bools_blocking(&ctx).unwrap(),
                "{what}: mask"
            );
            assert_close(&format!("{what} h"), &read(&ctx, &hf), &f64s(&h), ROUNDING, ROUNDING);
            assert_close(
                &format!("{what} y"),
                &read(&ctx, &yf),
                &f64s(&read(&ctx, &yu)),
                1e-5,
                1e-5,
            );
        }
        assert_eq!(fused.state(), (9, 2));
        assert_eq!(fused.last_call().map(|c| (c.offset, c.training)), Some((2, false)));
    }
}

#[test]
fn fused_residual_rejects_mismatched_residual_and_keeps_its_generator() {
    let ctx = gpu!();
    let mut fused =
        ResidualDropoutLayerNorm::new(&ctx, LayerNormConfig::new(&[8]), DropoutConfig::new(0.5), 1).unwrap();
    let x = Tensor::from_slice(&ctx, &[1.0f32; 16], &[2, 8]).unwrap();
    let residual = Tensor::from_slice(&ctx, &[1.0f32; 24], &[3, 8]).unwrap();
    assert!(matches!(
        fused.forward(&x, &residual),
        Err(normdrop::Error::Shape { what: "residual", .. })
    ));
    assert_eq!(fused.state(), (1, 0));
    assert!(fused.last_call().is_none());
    let mut bad_p = BatchNormDropout::new(&ctx, BatchNormConfig::new(2), DropoutConfig::new(1.5), 0);
    assert!(matches!(
        bad_p.as_mut().map(|_| ()),
        Err(normdrop::Error::InvalidArgument { .. })
    ));
}
