//! normdrop in the browser: every op family, forward and backward, on the page's WebGPU adapter
//! (headless Chromium's SwiftShader in CI: subgroups of 4, no `shader-f16`, so f16 runs packed),
//! against the f64 CPU reference, and dropout masks bit for bit against the CPU spec. Only the
//! async API is used: nothing here blocks or polls. Run by `scripts/test-web.sh` (wasm32 target,
//! wasm-bindgen-test-runner, chromedriver).
#![cfg(target_arch = "wasm32")]

use normdrop::kernels::DropoutUnit;
use normdrop::reference as r;
use normdrop::{
    BatchNorm, BatchNormConfig, BatchNormDropout, Context, DType, Dropout, Dropout2d, DropoutConfig, GroupNorm,
    GroupNormConfig, LayerNorm, LayerNormConfig, LayerNormDropout, ResidualDropoutLayerNorm, ResidualDropoutRmsNorm,
    RmsNorm, RmsNormConfig, Tensor,
};
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

/// Deterministic values in [−1, 1) around `centre`.
fn values(n: usize, seed: u64, centre: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            centre + ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

async fn read(ctx: &Context, t: &Tensor) -> Vec<f64> {
    match t.dtype() {
        DType::F32 => t.to_vec::<f32>(ctx).await.unwrap().into_iter().map(f64::from).collect(),
        DType::F16 => t
            .to_vec::<half::f16>(ctx)
            .await
            .unwrap()
            .into_iter()
            .map(|v| f64::from(v.to_f32()))
            .collect(),
    }
}

fn assert_close(what: &str, got: &[f64], exp: &[f64], tol: f64) {
    assert_eq!(got.len(), exp.len(), "{what}: length");
    let scale = exp.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (g, e)) in got.iter().zip(exp).enumerate() {
        assert!((g - e).abs() <= tol * scale, "{what}[{i}]: got {g}, expected {e}");
    }
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| f64::from(a)).collect()
}

#[wasm_bindgen_test]
async fn adapter_opens_with_webgpu() {
    let ctx = Context::new().await.unwrap();
    let info = ctx.adapter_info();
    web_sys_log(&format!(
        "adapter: {} ({:?}), features {:?}",
        info.name,
        info.backend,
        ctx.features()
    ));
    assert_eq!(info.backend, normdrop::wgpu::Backend::BrowserWebGpu);
}

fn web_sys_log(s: &str) {
    wasm_bindgen_test::console_log!("{s}");
}

#[wasm_bindgen_test]
async fn batch_norm_train_and_eval_forward_backward() {
    let ctx = Context::new().await.unwrap();
    let shape = [3, 5, 7, 4];
    let n: usize = shape.iter().product();
    let (x, dy) = (values(n, 1, 0.5), values(n, 2, 0.0));
    let config = BatchNormConfig::new(5);
    let mut bn = BatchNorm::with_config(&ctx, config.clone()).unwrap();
    let (xt, dyt) = (
        Tensor::from_slice(&ctx, &x, &shape).unwrap(),
        Tensor::from_slice(&ctx, &dy, &shape).unwrap(),
    );
    let y = bn.forward(&xt).unwrap();
    let g = bn.backward(&dyt).unwrap();
    let mut running = r::RefRunningStats::new(5);
    let f = r::batch_norm_forward(&x, &shape, &config, None, None, Some(&mut running), true).unwrap();
    let rg = r::batch_norm_backward(&wide(&x), &wide(&dy), &shape, &config, None, &f.mean, &f.invstd, true).unwrap();
    assert_close("train y", &read(&ctx, &y).await, &f.y, 1e-4);
    assert_close("train dx", &read(&ctx, &g.dx).await, &rg.dx, 1e-4);
    assert_close(
        "dweight",
        &read(&ctx, g.dweight.as_ref().unwrap()).await,
        &rg.dweight,
        1e-4,
    );
    assert_close("dbias", &read(&ctx, g.dbias.as_ref().unwrap()).await, &rg.dbias, 1e-4);
    assert_close(
        "running_mean",
        &read(&ctx, bn.running_mean().unwrap()).await,
        &running.mean,
        1e-4,
    );
    bn.eval();
    let y = bn.forward(&xt).unwrap();
    let g = bn.backward(&dyt).unwrap();
    let f = r::batch_norm_forward(&x, &shape, &config, None, None, Some(&mut running), false).unwrap();
    let rg = r::batch_norm_backward(&wide(&x), &wide(&dy), &shape, &config, None, &f.mean, &f.invstd, false).unwrap();
    assert_close("eval y", &read(&ctx, &y).await, &f.y, 1e-4);
    assert_close("eval dx", &read(&ctx, &g.dx).await, &rg.dx, 1e-4);
}

#[wasm_bindgen_test]
async fn layer_norm_and_rms_norm_forward_backward_f32_and_packed_f16() {
    let ctx = Context::new().await.unwrap();
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F16, 4e-3)] {
        let shape = [9, 130];
        let round = |v: Vec<f32>| -> Vec<f32> {
            match dtype {
                DType::F32 => v,
                DType::F16 => v.into_iter().map(|a| half::f16::from_f32(a).to_f32()).collect(),
            }
        };
        let (x, dy) = (round(values(9 * 130, 3, 0.2)), round(values(9 * 130, 4, 0.0)));
        let xt = Tensor::from_f32(&ctx, &x, &shape, dtype).unwrap();
        let dyt = Tensor::from_f32(&ctx, &dy, &shape, dtype).unwrap();
        let config = LayerNormConfig::new(&[130]);
        let mut ln = LayerNorm::with_config(&ctx, config.clone()).unwrap();
        let y = ln.forward(&xt).unwrap();
        let g = ln.backward(&dyt).unwrap();
        let f = r::layer_norm_forward(&wide(&x), &shape, &config, None, None).unwrap();
        let rg = r::layer_norm_backward(&wide(&x), &wide(&dy), &shape, &config, None, &f.mean, &f.rstd).unwrap();
        assert_close(&format!("{dtype} LayerNorm y"), &read(&ctx, &y).await, &f.y, tol);
        assert_close(&format!("{dtype} LayerNorm dx"), &read(&ctx, &g.dx).await, &rg.dx, tol);
        assert_close(
            &format!("{dtype} LayerNorm dγ"),
            &read(&ctx, g.dweight.as_ref().unwrap()).await,
            &rg.dweight,
            tol,
        );

        let config = RmsNormConfig::new(&[130]);
        let mut rms = RmsNorm::with_config(&ctx, config.clone()).unwrap();
        let y = rms.forward(&xt).unwrap();
        let g = rms.backward(&dyt).unwrap();
        let f = r::rms_norm_forward(&wide(&x), &shape, &config, None).unwrap();
        let rg = r::rms_norm_backward(&wide(&x), &wide(&dy), &shape, &config, None, &f.rstd).unwrap();
        assert_close(&format!("{dtype} RMSNorm y"), &read(&ctx, &y).await, &f.y, tol);
        assert_close(&format!("{dtype} RMSNorm dx"), &read(&ctx, &g.dx).await, &rg.dx, tol);
    }
}

#[wasm_bindgen_test]
async fn group_norm_forward_backward() {
    let ctx = Context::new().await.unwrap();
    let shape = [2, 8, 5, 3];
    let n: usize = shape.iter().product();
    let (x, dy) = (values(n, 5, 1.0), values(n, 6, 0.0));
    let config = GroupNormConfig::new(4, 8);
    let mut gn = GroupNorm::with_config(&ctx, config.clone()).unwrap();
    let y = gn.forward(&Tensor::from_slice(&ctx, &x, &shape).unwrap()).unwrap();
    let g = gn.backward(&Tensor::from_slice(&ctx, &dy, &shape).unwrap()).unwrap();
    let ones = vec![1.0; 8];
    let zeros = vec![0.0; 8];
    let f = r::group_norm_forward(&wide(&x), &shape, &config, Some(&ones), Some(&zeros)).unwrap();
    let rg = r::group_norm_backward(&wide(&x), &wide(&dy), &shape, &config, Some(&ones), &f.mean, &f.rstd).unwrap();
    assert_close("GroupNorm y", &read(&ctx, &y).await, &f.y, 1e-4);
    assert_close("GroupNorm dx", &read(&ctx, &g.dx).await, &rg.dx, 1e-4);
    assert_close(
        "GroupNorm dγ",
        &read(&ctx, g.dweight.as_ref().unwrap()).await,
        &rg.dweight,
        1e-4,
    );
    assert_close(
        "GroupNorm dβ",
        &read(&ctx, g.dbias.as_ref().unwrap()).await,
        &rg.dbias,
        1e-4,
    );
}

#[wasm_bindgen_test]
async fn dropout_masks_are_the_cpu_spec_bit_for_bit() {
    let ctx = Context::new().await.unwrap();
    let config = DropoutConfig::new(0.3);
    for unit in [DropoutUnit::Element, DropoutUnit::Channel] {
        let shape = [4, 6, 37];
        let n: usize = shape.iter().product();
        let x = values(n, 7, 3.0); // never 0, so a zero in y is a dropped element
        let xt = Tensor::from_slice(&ctx, &x, &shape).unwrap();
        let (y, dx) = match unit {
            DropoutUnit::Element => {
                let mut d = Dropout::with_config(&ctx, config, 1234).unwrap();
                let y = d.forward(&xt).unwrap();
                (y, d.backward(&xt).unwrap())
            }
            DropoutUnit::Channel => {
                let mut d = Dropout2d::with_config(&ctx, config, 1234).unwrap();
                let y = d.forward(&xt).unwrap();
                (y, d.backward(&xt).unwrap())
            }
        };
        let (exp, _) = r::dropout_forward(&x, &shape, &config, unit, 1234, 0, true).unwrap();
        let got = read(&ctx, &y).await;
        let kept: Vec<bool> = got.iter().map(|&v| v != 0.0).collect();
        let kept_exp: Vec<bool> = exp.iter().map(|&v| v != 0.0).collect();
        assert_eq!(kept, kept_exp, "{unit:?} mask");
        assert_close(&format!("{unit:?} y"), &got, &exp, 1e-6);
        // Backward of dy = x regenerates the same mask.
        assert_close(&format!("{unit:?} dx"), &read(&ctx, &dx).await, &exp, 1e-6);
    }
}

#[wasm_bindgen_test]
async fn fused_ops_match_their_unfused_chains() {
    let ctx = Context::new().await.unwrap();
    let dropout = DropoutConfig::new(0.2);
    // BatchNorm + dropout: the BatchNorm reference times the spec's mask.
    let shape = [4, 3, 33];
    let n: usize = shape.iter().product();
    let x = values(n, 8, 0.0);
    let config = BatchNormConfig::new(3);
    let mut fused = BatchNormDropout::new(&ctx, config.clone(), dropout, 99).unwrap();
    let y = fused.forward(&Tensor::from_slice(&ctx, &x, &shape).unwrap()).unwrap();
    let mut running = r::RefRunningStats::new(3);
    let f = r::batch_norm_forward(&x, &shape, &config, None, None, Some(&mut running), true).unwrap();
    let (m, _) = r::dropout_forward(&vec![1.0; n], &shape, &dropout, DropoutUnit::Element, 99, 0, true).unwrap();
    let exp: Vec<f64> = f.y.iter().zip(&m).map(|(a, b)| a * b).collect();
    assert_close("BatchNorm+dropout y", &read(&ctx, &y).await, &exp, 1e-4);
    let g = fused.backward(&Tensor::from_slice(&ctx, &x, &shape).unwrap()).unwrap();
    let dym: Vec<f64> = x.iter().zip(&m).map(|(&d, f)| f64::from(d) * f).collect();
    let rg = r::batch_norm_backward(&wide(&x), &dym, &shape, &config, None, &f.mean, &f.invstd, true).unwrap();
    assert_close("BatchNorm+dropout dx", &read(&ctx, &g.dx).await, &rg.dx, 1e-4);

    // Residual + dropout + LayerNorm: h = residual + x·m, y = LayerNorm(h).
    let shape = [6, 64];
    let n = 6 * 64;
    let (x, res) = (values(n, 9, 0.0), values(n, 10, 0.5));
    let config = LayerNormConfig::new(&[64]);
    let mut block = ResidualDropoutLayerNorm::new(&ctx, config.clone(), dropout, 5).unwrap();
    let (y, h) = block
        .forward(
            &Tensor::from_slice(&ctx, &x, &shape).unwrap(),
            &Tensor::from_slice(&ctx, &res, &shape).unwrap(),
        )
        .unwrap();
    let (m, _) = r::dropout_forward(&vec![1.0; n], &shape, &dropout, DropoutUnit::Element, 5, 0, true).unwrap();
    let h_exp: Vec<f64> = x
        .iter()
        .zip(&m)
        .zip(&res)
        .map(|((&a, f), &b)| f64::from(b + (f64::from(a) * f) as f32))
        .collect();
    let f = r::layer_norm_forward(&h_exp, &shape, &config, None, None).unwrap();
    assert_close("residual block h", &read(&ctx, &h).await, &h_exp, 1e-6);
    assert_close("residual block y", &read(&ctx, &y).await, &f.y, 1e-4);
    // Its backward: dresidual = dL/dh = LayerNorm's dx, and dx = that times the mask.
    let dy = values(n, 11, 0.0);
    let g = block
        .backward(&Tensor::from_slice(&ctx, &dy, &shape).unwrap(), None)
        .unwrap();
    let rg = r::layer_norm_backward(&h_exp, &wide(&dy), &shape, &config, None, &f.mean, &f.rstd).unwrap();
    let dx_exp: Vec<f64> = rg.dx.iter().zip(&m).map(|(a, b)| a * b).collect();
    assert_close(
        "residual block dresidual",
        &read(&ctx, &g.dresidual).await,
        &rg.dx,
        1e-4,
    );
    assert_close("residual block dx", &read(&ctx, &g.dx).await, &dx_exp, 1e-4);

    // LayerNorm + dropout: y = LayerNorm(x)·m; backward applies the mask to dy first.
    let mut lnd = LayerNormDropout::new(&ctx, config.clone(), dropout, 21).unwrap();
    let y = lnd.forward(&Tensor::from_slice(&ctx, &x, &shape).unwrap()).unwrap();
    let (m, _) = r::dropout_forward(&vec![1.0; n], &shape, &dropout, DropoutUnit::Element, 21, 0, true).unwrap();
    let f = r::layer_norm_forward(&wide(&x), &shape, &config, None, None).unwrap();
    let exp: Vec<f64> = f.y.iter().zip(&m).map(|(a, b)| a * b).collect();
    assert_close("LayerNorm+dropout y", &read(&ctx, &y).await, &exp, 1e-4);
    let g = lnd.backward(&Tensor::from_slice(&ctx, &dy, &shape).unwrap()).unwrap();
    let dym: Vec<f64> = dy.iter().zip(&m).map(|(&d, f)| f64::from(d) * f).collect();
    let rg = r::layer_norm_backward(&wide(&x), &dym, &shape, &config, None, &f.mean, &f.rstd).unwrap();
    assert_close("LayerNorm+dropout dx", &read(&ctx, &g.dx).await, &rg.dx, 1e-4);

    // Residual + dropout + RMSNorm, forward and backward.
    let config = RmsNormConfig::new(&[64]);
    let mut block = ResidualDropoutRmsNorm::new(&ctx, config.clone(), dropout, 33).unwrap();
    let (y, h) = block
        .forward(
            &Tensor::from_slice(&ctx, &x, &shape).unwrap(),
            &Tensor::from_slice(&ctx, &res, &shape).unwrap(),
        )
        .unwrap();
    let (m, _) = r::dropout_forward(&vec![1.0; n], &shape, &dropout, DropoutUnit::Element, 33, 0, true).unwrap();
    let h_exp: Vec<f64> = x
        .iter()
        .zip(&m)
        .zip(&res)
        .map(|((&a, f), &b)| f64::from(b + (f64::from(a) * f) as f32))
        .collect();
    let f = r::rms_norm_forward(&h_exp, &shape, &config, None).unwrap();
    assert_close("residual RMSNorm h", &read(&ctx, &h).await, &h_exp, 1e-6);
    assert_close("residual RMSNorm y", &read(&ctx, &y).await, &f.y, 1e-4);
    let g = block
        .backward(&Tensor::from_slice(&ctx, &dy, &shape).unwrap(), None)
        .unwrap();
    let rg = r::rms_norm_backward(&h_exp, &wide(&dy), &shape, &config, None, &f.rstd).unwrap();
    let dx_exp: Vec<f64> = rg.dx.iter().zip(&m).map(|(a, b)| a * b).collect();
    assert_close(
        "residual RMSNorm dresidual",
        &read(&ctx, &g.dresidual).await,
        &rg.dx,
        1e-4,
    );
    assert_close("residual RMSNorm dx", &read(&ctx, &g.dx).await, &dx_exp, 1e-4);
}
