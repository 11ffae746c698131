//! normdrop's browser demo (`web/index.html`): opens WebGPU, prints the adapter and its
//! features, runs BatchNorm (train and eval, forward and backward), LayerNorm, RMSNorm,
//! GroupNorm, dropout and a fused op, checks each result against the f64 CPU reference (the
//! dropout masks bit for bit against the CPU spec) and times each op (wall time of several
//! calls, ended by a readback; GB/s by the op's minimal bytes). [`report`] does the work and
//! `tests/demo.rs` runs it in headless Chromium; [`run_demo`] renders it as HTML for the page.

use normdrop::kernels::DropoutUnit;
use normdrop::reference as r;
use normdrop::{
    BatchNorm, BatchNormConfig, BatchNormDropout, Context, Dropout, DropoutConfig, GroupNorm, GroupNormConfig,
    LayerNorm, LayerNormConfig, RmsNorm, RmsNormConfig, Tensor,
};
use wasm_bindgen::prelude::*;

/// One checked and timed op.
#[derive(Clone, Debug)]
pub struct Row {
    /// Op and direction.
    pub op: String,
    /// Input shape.
    pub shape: Vec<usize>,
    /// Largest error against the reference, relative to the largest expected value.
    pub max_rel_err: f64,
    /// Whether it is within the tolerance (and the mask, for dropout, is bit-exact).
    pub passed: bool,
    /// Median-free mean of the timed calls, microseconds.
    pub micros: f64,
    /// Minimal bytes ÷ time.
    pub gb_per_s: f64,
}

/// What the demo found.
#[derive(Clone, Debug)]
pub struct Report {
    /// Adapter name and backend.
    pub adapter: String,
    /// The optional features normdrop uses that the adapter has.
    pub features: String,
    /// One row per op.
    pub rows: Vec<Row>,
}

const TOL: f64 = 1e-4;
const CALLS: usize = 10;

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

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| f64::from(a)).collect()
}

fn rel_err(got: &[f32], exp: &[f64]) -> f64 {
    let scale = exp.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    if got.len() != exp.len() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(exp)
        .map(|(&g, e)| (f64::from(g) - e).abs() / scale)
        .fold(0.0, f64::max)
}

fn now_ms() -> f64 {
    js_sys::Date::now()
}

fn err(e: normdrop::Error) -> String {
    e.to_string()
}

/// Times `CALLS` calls of `call` (each submits), ended by reading `last` back so that the GPU
/// work is included.
async fn time<F: FnMut() -> normdrop::Result<Tensor>>(ctx: &Context, mut call: F) -> Result<f64, String> {
    let start = now_ms();
    let mut last = None;
    for _ in 0..CALLS {
        last = Some(call().map_err(err)?);
    }
    if let Some(t) = last {
        t.to_vec::<f32>(ctx).await.map_err(err)?;
    }
    Ok((now_ms() - start) * 1000.0 / CALLS as f64)
}

fn row(op: &str, shape: &[usize], max_rel_err: f64, exact: bool, micros: f64, passes: u64) -> Row {
    let numel: usize = shape.iter().product();
    Row {
        op: op.into(),
        shape: shape.to_vec(),
        max_rel_err,
        passed: exact && max_rel_err <= TOL,
        micros,
        gb_per_s: (passes * numel as u64 * 4) as f64 / (micros * 1e3),
    }
}

/// Runs every op on a fresh context and returns the checks and timings.
pub async fn report() -> Result<Report, String> {
    let ctx = Context::new().await.map_err(err)?;
    let info = ctx.adapter_info();
    let adapter = format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type);
    let features = format!("{:?}", ctx.features());
    let mut rows = Vec::new();

    // BatchNorm, train and eval.
    let shape = [8, 16, 16, 16];
    let n: usize = shape.iter().product();
    let (x, dy) = (values(n, 1, 0.5), values(n, 2, 0.0));
    let (xt, dyt) = (
        Tensor::from_slice(&ctx, &x, &shape).map_err(err)?,
        Tensor::from_slice(&ctx, &dy, &shape).map_err(err)?,
    );
    let config = BatchNormConfig::new(16);
    let mut bn = BatchNorm::with_config(&ctx, config.clone()).map_err(err)?;
    let y = bn.forward(&xt).map_err(err)?;
    let g = bn.backward(&dyt).map_err(err)?;
    let mut running = r::RefRunningStats::new(16);
    let f = r::batch_norm_forward(&x, &shape, &config, None, None, Some(&mut running), true).map_err(err)?;
    let rg =
        r::batch_norm_backward(&wide(&x), &wide(&dy), &shape, &config, None, &f.mean, &f.invstd, true).map_err(err)?;
    let e_fwd = rel_err(&y.to_vec(&ctx).await.map_err(err)?, &f.y);
    let e_bwd = rel_err(&g.dx.to_vec(&ctx).await.map_err(err)?, &rg.dx);
    let t = time(&ctx, || bn.forward(&xt)).await?;
    rows.push(row("BatchNorm train forward", &shape, e_fwd, true, t, 3));
    bn.forward(&xt).map_err(err)?;
    let t = time(&ctx, || bn.backward(&dyt).map(|g| g.dx)).await?;
    rows.push(row("BatchNorm train backward", &shape, e_bwd, true, t, 5));
    bn.eval();
    let y = bn.forward(&xt).map_err(err)?;
    let stats = r::RefRunningStats {
        mean: wide(&bn.running_mean().expect("tracked").to_vec(&ctx).await.map_err(err)?),
        var: wide(&bn.running_var().expect("tracked").to_vec(&ctx).await.map_err(err)?),
        num_batches_tracked: 0,
    };
    let mut eval_stats = stats.clone();
    let f = r::batch_norm_forward(&x, &shape, &config, None, None, Some(&mut eval_stats), false).map_err(err)?;
    let e = rel_err(&y.to_vec(&ctx).await.map_err(err)?, &f.y);
    let g = bn.backward(&dyt).map_err(err)?;
    let rg =
        r::batch_norm_backward(&wide(&x), &wide(&dy), &shape, &config, None, &f.mean, &f.invstd, false).map_err(err)?;
    let e_bwd = rel_err(&g.dx.to_vec(&ctx).await.map_err(err)?, &rg.dx);
    let t = time(&ctx, || bn.forward(&xt)).await?;
    rows.push(row("BatchNorm eval forward", &shape, e, true, t, 2));
    let t = time(&ctx, || bn.backward(&dyt).map(|g| g.dx)).await?;
    rows.push(row("BatchNorm eval backward", &shape, e_bwd, true, t, 3));

    // LayerNorm and RMSNorm over rows of 768.
    let lshape = [256, 768];
    let ln_n = 256 * 768;
    let (lx, ldy) = (values(ln_n, 3, 0.2), values(ln_n, 4, 0.0));
    let (lxt, ldyt) = (
        Tensor::from_slice(&ctx, &lx, &lshape).map_err(err)?,
        Tensor::from_slice(&ctx, &ldy, &lshape).map_err(err)?,
    );
    let lconfig = LayerNormConfig::new(&[768]);
    let mut ln = LayerNorm::with_config(&ctx, lconfig.clone()).map_err(err)?;
    let y = ln.forward(&lxt).map_err(err)?;
    let g = ln.backward(&ldyt).map_err(err)?;
    let f = r::layer_norm_forward(&wide(&lx), &lshape, &lconfig, None, None).map_err(err)?;
    let rg = r::layer_norm_backward(&wide(&lx), &wide(&ldy), &lshape, &lconfig, None, &f.mean, &f.rstd).map_err(err)?;
    let e_fwd = rel_err(&y.to_vec(&ctx).await.map_err(err)?, &f.y);
    let e_bwd = rel_err(&g.dx.to_vec(&ctx).await.map_err(err)?, &rg.dx);
    let t = time(&ctx, || ln.forward(&lxt)).await?;
    rows.push(row("LayerNorm forward", &lshape, e_fwd, true, t, 2));
    let t = time(&ctx, || ln.backward(&ldyt).map(|g| g.dx)).await?;
    rows.push(row("LayerNorm backward", &lshape, e_bwd, true, t, 3));
    let rconfig = RmsNormConfig::new(&[768]);
    let mut rms = RmsNorm::with_config(&ctx, rconfig.clone()).map_err(err)?;
    let y = rms.forward(&lxt).map_err(err)?;
    let g = rms.backward(&ldyt).map_err(err)?;
    let f = r::rms_norm_forward(&wide(&lx), &lshape, &rconfig, None).map_err(err)?;
    let rg = r::rms_norm_backward(&wide(&lx), &wide(&ldy), &lshape, &rconfig, None, &f.rstd).map_err(err)?;
    let e_fwd = rel_err(&y.to_vec(&ctx).await.map_err(err)?, &f.y);
    let e_bwd = rel_err(&g.dx.to_vec(&ctx).await.map_err(err)?, &rg.dx);
    let t = time(&ctx, || rms.forward(&lxt)).await?;
    rows.push(row("RMSNorm forward", &lshape, e_fwd, true, t, 2));
    let t = time(&ctx, || rms.backward(&ldyt).map(|g| g.dx)).await?;
    rows.push(row("RMSNorm backward", &lshape, e_bwd, true, t, 3));

    // GroupNorm(8, 16) on the BatchNorm shape.
    let gconfig = GroupNormConfig::new(8, 16);
    let mut gn = GroupNorm::with_config(&ctx, gconfig.clone()).map_err(err)?;
    let y = gn.forward(&xt).map_err(err)?;
    let g = gn.backward(&dyt).map_err(err)?;
    let (ones, zeros) = (vec![1.0; 16], vec![0.0; 16]);
    let f = r::group_norm_forward(&wide(&x), &shape, &gconfig, Some(&ones), Some(&zeros)).map_err(err)?;
    let rg =
        r::group_norm_backward(&wide(&x), &wide(&dy), &shape, &gconfig, Some(&ones), &f.mean, &f.rstd).map_err(err)?;
    let e_fwd = rel_err(&y.to_vec(&ctx).await.map_err(err)?, &f.y);
    let e_bwd = rel_err(&g.dx.to_vec(&ctx).await.map_err(err)?, &rg.dx);
    let t = time(&ctx, || gn.forward(&xt)).await?;
    rows.push(row("GroupNorm forward", &shape, e_fwd, true, t, 3));
    let t = time(&ctx, || gn.backward(&dyt).map(|g| g.dx)).await?;
    rows.push(row("GroupNorm backward", &shape, e_bwd, true, t, 5));

    // Dropout: the mask bit for bit against the CPU spec.
    let dropout = DropoutConfig::new(0.1);
    let dx_in = values(n, 5, 3.0); // never 0: a zero in y is a dropped element
    let dxt = Tensor::from_slice(&ctx, &dx_in, &shape).map_err(err)?;
    let mut d = Dropout::with_config(&ctx, dropout, 42).map_err(err)?;
    let y: Vec<f32> = d.forward(&dxt).map_err(err)?.to_vec(&ctx).await.map_err(err)?;
    let (exp, _) = r::dropout_forward(&dx_in, &shape, &dropout, DropoutUnit::Element, 42, 0, true).map_err(err)?;
    let exact = y.iter().zip(&exp).all(|(&a, &b)| (a != 0.0) == (b != 0.0));
    let e = rel_err(&y, &exp);
    let t = time(&ctx, || d.forward(&dxt)).await?;
    rows.push(row("Dropout forward (mask bit-exact)", &shape, e, exact, t, 2));

    // BatchNorm + dropout in one pass: the BatchNorm reference times the spec's mask.
    let mut fused = BatchNormDropout::new(&ctx, config.clone(), dropout, 7).map_err(err)?;
    let y: Vec<f32> = fused.forward(&xt).map_err(err)?.to_vec(&ctx).await.map_err(err)?;
    let mut running = r::RefRunningStats::new(16);
    let f = r::batch_norm_forward(&x, &shape, &config, None, None, Some(&mut running), true).map_err(err)?;
    let (m, _) = r::dropout_forward(&vec![1.0; n], &shape, &dropout, DropoutUnit::Element, 7, 0, true).map_err(err)?;
    let exp: Vec<f64> = f.y.iter().zip(&m).map(|(a, b)| a * b).collect();
    let exact = y.iter().zip(&exp).all(|(&a, &b)| (a == 0.0) == (b == 0.0));
    let e = rel_err(&y, &exp);
    let t = time(&ctx, || fused.forward(&xt)).await?;
    rows.push(row("BatchNorm+dropout forward", &shape, e, exact, t, 3));

    Ok(Report {
        adapter,
        features,
        rows,
    })
}

/// The report as HTML (the page's content).
pub fn render(report: &Report) -> String {
    let mut html = format!(
        "<p>Adapter: <b>{}</b><br>Features normdrop uses: {}</p>\n<table>\n<tr><th>op</th><th>shape</th>\
         <th>check</th><th>max rel. error</th><th>µs per call</th><th>GB/s</th></tr>\n",
        report.adapter, report.features
    );
    for r in &report.rows {
        let shape: Vec<String> = r.shape.iter().map(usize::to_string).collect();
        html += &format!(
            "<tr><td>{}</td><td>{}</td><td{}>{}</td><td>{:.1e}</td><td>{:.0}</td><td>{:.2}</td></tr>\n",
            r.op,
            shape.join("×"),
            if r.passed { "" } else { " class=\"fail\"" },
            if r.passed { "ok" } else { "FAILED" },
            r.max_rel_err,
            r.micros,
            r.gb_per_s
        );
    }
    let failed = report.rows.iter().filter(|r| !r.passed).count();
    html += &format!(
        "</table>\n<p>{} passed, {failed} failed. Times are wall time per call over {CALLS} calls ended by a \
         readback; GB/s counts each op's minimal bytes.</p>\n",
        report.rows.len() - failed
    );
    html
}

/// The page's entry point: runs [`report`] and returns it as HTML.
#[wasm_bindgen]
pub async fn run_demo() -> Result<String, JsValue> {
    report().await.map(|r| render(&r)).map_err(|e| JsValue::from_str(&e))
}
