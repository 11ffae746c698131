//! PyTorch reference fixtures (`normdrop-fixture/1`, see `tests/fixtures/FORMAT.md`): reading
//! them, running them through the kernels, and comparing with the format's rule
//!
//! ```text
//! |got − exp| <= atol · max(1, max|exp|) + rtol · |exp|      (NaN anywhere fails)
//! ```
//!
//! `normdrop check` and the test suite both use [`check`], so they cannot disagree.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use normdrop::{
    BatchNorm, BatchNormConfig, Context, DType, Error, GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Result,
    RmsNorm, RmsNormConfig, Storage, Tensor,
};

/// One tensor of a fixture, widened to f64.
#[derive(Clone, Debug)]
pub struct FixtureTensor {
    /// The stored dtype (`"F64"`, `"F32"`, `"F16"`, `"I64"`).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, widened to f64.
    pub data: Vec<f64>,
}

/// A parsed fixture file.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// File stem, e.g. `bn2d_train_basic`.
    pub name: String,
    /// `batch_norm` or `layer_norm`.
    pub op: String,
    /// The op's configuration object.
    pub config: serde_json::Value,
    /// Activation dtype, `float32` or `float16`.
    pub dtype: String,
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance (scaled by `max(1, max|exp|)`).
    pub atol: f64,
    /// Every tensor in the file by name.
    pub tensors: BTreeMap<String, FixtureTensor>,
}

impl Fixture {
    /// Reads a fixture file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let name = path
            .file_stem()
            .map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
        Self::from_bytes(&name, &bytes)
    }

    /// Parses a fixture image.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Self> {
        let (_, meta) = SafeTensors::read_metadata(bytes)?;
        let md = meta
            .metadata()
            .clone()
            .ok_or_else(|| Error::SafeTensors(format!("{name}: no __metadata__")))?;
        let get = |k: &str| {
            md.get(k)
                .cloned()
                .ok_or_else(|| Error::SafeTensors(format!("{name}: metadata lacks `{k}`")))
        };
        let format = get("format")?;
        if format != "normdrop-fixture/1" {
            return Err(Error::SafeTensors(format!(
                "{name}: format {format:?}, expected normdrop-fixture/1"
            )));
        }
        let num = |k: &str| -> Result<f64> {
            get(k)?
                .parse()
                .map_err(|_| Error::SafeTensors(format!("{name}: `{k}` is not a number")))
        };
        let config =
            serde_json::from_str(&get("config")?).map_err(|e| Error::SafeTensors(format!("{name}: config: {e}")))?;
        let st = SafeTensors::deserialize(bytes)?;
        let mut tensors = BTreeMap::new();
        for (tname, view) in st.iter() {
            tensors.insert(
                tname.to_string(),
                FixtureTensor {
                    dtype: format!("{:?}", view.dtype()),
                    shape: view.shape().to_vec(),
                    data: view_to_f64(tname, &view)?,
                },
            );
        }
        let tolerance = |k: &str| -> Result<f64> {
            let v = num(k)?;
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(Error::SafeTensors(format!(
                    "{name}: `{k}` is {v}, expected a finite non-negative tolerance"
                )))
            }
        };
        let dtype = get("dtype")?;
        if dtype != "float32" && dtype != "float16" {
            return Err(Error::SafeTensors(format!(
                "{name}: dtype {dtype:?}, expected \"float32\" or \"float16\""
            )));
        }
        Ok(Self {
            name: name.to_string(),
            op: get("op")?,
            config,
            dtype,
            rtol: tolerance("rtol")?,
            atol: tolerance("atol")?,
            tensors,
        })
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Result<&FixtureTensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::SafeTensors(format!("{}: missing tensor `{name}`", self.name)))
    }

    /// Names of the expected outputs (f64 and i64 tensors), sorted.
    pub fn expected_names(&self) -> Vec<String> {
        self.tensors
            .iter()
            .filter(|(_, t)| t.dtype == format!("{:?}", Dtype::F64) || t.dtype == format!("{:?}", Dtype::I64))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// Result of comparing one tensor with the format's rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Comparison {
    /// Largest `|got − exp|`.
    pub max_abs_err: f64,
    /// Largest `|got − exp| / allowed`; the tensor passes when this is ≤ 1.
    pub worst_ratio: f64,
    /// Whether every element is within tolerance and no value is NaN.
    pub passed: bool,
}

/// Compares `got` with `exp` element by element with the fixture rule.
pub fn compare(got: &[f64], exp: &[f64], rtol: f64, atol: f64) -> Comparison {
    if got.len() != exp.len() {
        return Comparison {
            max_abs_err: f64::INFINITY,
            worst_ratio: f64::INFINITY,
            passed: false,
        };
    }
    let scale = exp.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let mut out = Comparison {
        max_abs_err: 0.0,
        worst_ratio: 0.0,
        passed: true,
    };
    for (&g, &e) in got.iter().zip(exp) {
        if g.is_nan() || e.is_nan() {
            out.passed = false;
            out.max_abs_err = f64::NAN;
            out.worst_ratio = f64::INFINITY;
            continue;
        }
        let err = (g - e).abs();
        let allowed = atol * scale + rtol * e.abs();
        out.max_abs_err = out.max_abs_err.max(err);
        let ratio = if allowed > 0.0 {
            err / allowed
        } else if err == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        out.worst_ratio = out.worst_ratio.max(ratio);
        if err > allowed {
            out.passed = false;
        }
    }
    out
}

/// The verdict on one expected tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Within tolerance.
    Pass(Comparison),
    /// Outside tolerance, or the computation failed (the string says how).
    Fail(String),
    /// Not computed by this version; the string says why. Never counted as passed.
    Skip(String),
}

/// One line of a fixture check.
#[derive(Clone, Debug)]
pub struct CheckLine {
    /// Fixture name.
    pub fixture: String,
    /// Expected tensor name.
    pub tensor: String,
    /// The verdict.
    pub verdict: Verdict,
    /// A remark about how the value was computed, if any.
    pub note: Option<String>,
}

impl std::fmt::Display for CheckLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = format!("{:<34} {:<26}", self.fixture, self.tensor);
        match &self.verdict {
            Verdict::Pass(c) => write!(
                f,
                "{head} ok       max_abs_err {:.3e}  ({:.1}% of tolerance)",
                c.max_abs_err,
                100.0 * c.worst_ratio
            )?,
            Verdict::Fail(why) => write!(f, "{head} FAILED   {why}")?,
            Verdict::Skip(why) => write!(f, "{head} skipped  {why}")?,
        }
        if let Some(n) = &self.note {
            write!(f, "  [{n}]")?;
        }
        Ok(())
    }
}

/// Runs a fixture through the kernels and returns one line per expected tensor, in the
/// fixture's (sorted) order. An error here means the fixture itself is malformed, names an op
/// this version does not check, or expects nothing; failures of the kernels, and expected
/// tensors this version does not compute, are reported as [`Verdict::Fail`] lines.
pub fn check(ctx: &Context, fx: &Fixture) -> Result<Vec<CheckLine>> {
    // A check that would compare nothing, or meets an op it does not know, fails: it must never
    // read as a pass.
    if fx.expected_names().is_empty() {
        return Err(Error::SafeTensors(format!(
            "{}: no expected tensors (float64 or int64): nothing to compare",
            fx.name
        )));
    }
    let mut results: BTreeMap<String, (Verdict, Option<String>)> = BTreeMap::new();
    match fx.op.as_str() {
        "batch_norm" => check_batch_norm(ctx, fx, &mut results)?,
        "layer_norm" => check_layer_norm(ctx, fx, &mut results)?,
        "rms_norm" => check_rms_norm(ctx, fx, &mut results)?,
        "group_norm" => check_group_norm(ctx, fx, &mut results)?,
        other => {
            return Err(Error::SafeTensors(format!(
                "{}: unknown op {other:?} (this version checks batch_norm, layer_norm, rms_norm and group_norm)",
                fx.name
            )))
        }
    }
    Ok(fx
        .expected_names()
        .into_iter()
        .map(|name| {
            let (verdict, note) = results.remove(&name).unwrap_or_else(|| {
                (
                    Verdict::Fail("an expected tensor this version does not compute".into()),
                    None,
                )
            });
            CheckLine {
                fixture: fx.name.clone(),
                tensor: name,
                verdict,
                note,
            }
        })
        .collect())
}

fn judge(fx: &Fixture, name: &str, got: Result<Vec<f64>>) -> Result<Verdict> {
    let exp = fx.tensor(name)?;
    Ok(match got {
        Err(e) => Verdict::Fail(format!("error: {e}")),
        Ok(got) => {
            let c = compare(&got, &exp.data, fx.rtol, fx.atol);
            if c.passed {
                Verdict::Pass(c)
            } else {
                Verdict::Fail(format!(
                    "max_abs_err {:.3e} ({:.1}× tolerance{})",
                    c.max_abs_err,
                    c.worst_ratio,
                    if got.len() != exp.data.len() {
                        ", length mismatch"
                    } else {
                        ""
                    }
                ))
            }
        }
    })
}

/// An activation input (x, dy) on the GPU in the fixture's dtype: f16 fixtures run with f16
/// tensors (their values are f16 already, so the conversion is exact).
fn activation(ctx: &Context, fx: &Fixture, name: &str) -> Result<Tensor> {
    let (v, shape) = f32_input(fx, name)?;
    let dtype = if fx.dtype == "float16" { DType::F16 } else { DType::F32 };
    Tensor::from_f32(ctx, &v, &shape, dtype)
}

fn f32_input(fx: &Fixture, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let t = fx.tensor(name)?;
    Ok((t.data.iter().map(|&v| v as f32).collect(), t.shape.clone()))
}

fn check_batch_norm(ctx: &Context, fx: &Fixture, out: &mut BTreeMap<String, (Verdict, Option<String>)>) -> Result<()> {
    let cfg = &fx.config;
    let bad = |k: &str| Error::SafeTensors(format!("{}: config.{k} missing or mistyped", fx.name));
    let config = BatchNormConfig {
        num_features: cfg["num_features"].as_u64().ok_or_else(|| bad("num_features"))? as usize,
        eps: cfg["eps"].as_f64().ok_or_else(|| bad("eps"))? as f32,
        momentum: if cfg["momentum"].is_null() {
            None
        } else {
            Some(cfg["momentum"].as_f64().ok_or_else(|| bad("momentum"))? as f32)
        },
        affine: cfg["affine"].as_bool().ok_or_else(|| bad("affine"))?,
        track_running_stats: cfg["track_running_stats"]
            .as_bool()
            .ok_or_else(|| bad("track_running_stats"))?,
    };
    let training = cfg["training"].as_bool().ok_or_else(|| bad("training"))?;
    let steps = cfg["steps"].as_u64().ok_or_else(|| bad("steps"))? as usize;
    let note = f16_note(ctx, fx);

    let mut run = || -> Result<BatchNorm> {
        let mut bn = BatchNorm::with_config(ctx, config.clone())?;
        if config.affine {
            bn.set_weight(&f32_input(fx, "weight")?.0)?;
            bn.set_bias(&f32_input(fx, "bias")?.0)?;
        }
        if config.track_running_stats {
            bn.set_running_mean(&f32_input(fx, "running_mean")?.0)?;
            bn.set_running_var(&f32_input(fx, "running_var")?.0)?;
        }
        if !training {
            bn.eval();
        }
        for step in 0..steps {
            let x = activation(ctx, fx, &format!("x.{step}"))?;
            let y = bn.forward(&x).and_then(|y| y.to_f64_blocking(ctx));
            let name = format!("y.{step}");
            out.insert(name.clone(), (judge(fx, &name, y)?, note.clone()));
        }
        Ok(bn)
    };
    let mut bn = match run() {
        Ok(bn) => bn,
        Err(e) => {
            fail_remaining(fx, out, &e);
            return Ok(());
        }
    };
    if let (Some(rm), Some(rv)) = (bn.running_mean(), bn.running_var()) {
        out.insert(
            "running_mean.final".into(),
            (judge(fx, "running_mean.final", rm.to_f64_blocking(ctx))?, note.clone()),
        );
        out.insert(
            "running_var.final".into(),
            (judge(fx, "running_var.final", rv.to_f64_blocking(ctx))?, note.clone()),
        );
        let count = bn.num_batches_tracked_blocking().map(|n| vec![n.unwrap_or(0) as f64]);
        out.insert(
            "num_batches_tracked.final".into(),
            (judge(fx, "num_batches_tracked.final", count)?, None),
        );
    }
    if let Some(saved) = bn.saved().filter(|s| s.batch_stats) {
        for (name, t) in [("save_mean", &saved.mean), ("save_invstd", &saved.invstd)] {
            if fx.tensors.contains_key(name) {
                out.insert(name.into(), (judge(fx, name, t.to_f64_blocking(ctx))?, note.clone()));
            }
        }
    }
    // Gradients of the last step's output against dy.
    let grads = activation(ctx, fx, "dy").and_then(|dy| bn.backward(&dy));
    judge_grads(ctx, fx, out, grads.map(|g| [Some(g.dx), g.dweight, g.dbias]), &note)
}

/// Compares `[dx, dweight, dbias]` (those the fixture has) or reports the error on each.
fn judge_grads(
    ctx: &Context,
    fx: &Fixture,
    out: &mut BTreeMap<String, (Verdict, Option<String>)>,
    grads: Result<[Option<Tensor>; 3]>,
    note: &Option<String>,
) -> Result<()> {
    let names = ["dx", "dweight", "dbias"];
    match grads {
        Ok(grads) => {
            for (name, t) in names.iter().zip(grads) {
                if fx.tensors.contains_key(*name) {
                    let got = t.ok_or_else(|| Error::State {
                        op: "fixture",
                        reason: format!("no {name} computed"),
                    });
                    out.insert(
                        name.to_string(),
                        (judge(fx, name, got.and_then(|t| t.to_f64_blocking(ctx)))?, note.clone()),
                    );
                }
            }
        }
        Err(e) => {
            for name in names.iter().filter(|n| fx.tensors.contains_key(**n)) {
                out.insert(name.to_string(), (Verdict::Fail(format!("backward error: {e}")), None));
            }
        }
    }
    Ok(())
}

/// The remark on lines of float16 fixtures: which f16 storage path ran.
fn f16_note(ctx: &Context, fx: &Fixture) -> Option<String> {
    (fx.dtype == "float16").then(|| match ctx.storage(DType::F16) {
        Storage::F16 => "f16 activations, native shader-f16 storage".to_string(),
        _ => "f16 activations, packed-u32 storage".to_string(),
    })
}

fn check_layer_norm(ctx: &Context, fx: &Fixture, out: &mut BTreeMap<String, (Verdict, Option<String>)>) -> Result<()> {
    let cfg = &fx.config;
    let bad = |k: &str| Error::SafeTensors(format!("{}: config.{k} missing or mistyped", fx.name));
    let normalized_shape = usizes(&cfg["normalized_shape"]).ok_or_else(|| bad("normalized_shape"))?;
    let config = LayerNormConfig {
        normalized_shape,
        eps: cfg["eps"].as_f64().ok_or_else(|| bad("eps"))? as f32,
        elementwise_affine: cfg["elementwise_affine"]
            .as_bool()
            .ok_or_else(|| bad("elementwise_affine"))?,
        bias: cfg["bias"].as_bool().ok_or_else(|| bad("bias"))?,
    };
    let note = f16_note(ctx, fx);
    let mut run = || -> Result<LayerNorm> {
        let mut ln = LayerNorm::with_config(ctx, config.clone())?;
        if config.has_weight() {
            ln.set_weight(&f32_input(fx, "weight")?.0)?;
        }
        if config.has_bias() {
            ln.set_bias(&f32_input(fx, "bias")?.0)?;
        }
        let y = ln
            .forward(&activation(ctx, fx, "x")?)
            .and_then(|y| y.to_f64_blocking(ctx));
        out.insert("y".into(), (judge(fx, "y", y)?, note.clone()));
        Ok(ln)
    };
    match run() {
        Ok(mut ln) => {
            let saved = ln.saved().expect("a successful forward saves its statistics").clone();
            for (name, t) in [("mean", &saved.mean), ("rstd", &saved.rstd)] {
                out.insert(name.into(), (judge(fx, name, t.to_f64_blocking(ctx))?, note.clone()));
            }
            let grads = activation(ctx, fx, "dy").and_then(|dy| ln.backward(&dy));
            judge_grads(ctx, fx, out, grads.map(|g| [Some(g.dx), g.dweight, g.dbias]), &note)?;
        }
        Err(e) => {
            fail_remaining(fx, out, &e);
        }
    }
    Ok(())
}

/// A JSON array of non-negative integers, if it is one.
fn usizes(v: &serde_json::Value) -> Option<Vec<usize>> {
    v.as_array()?.iter().map(|d| d.as_u64().map(|d| d as usize)).collect()
}

fn check_rms_norm(ctx: &Context, fx: &Fixture, out: &mut BTreeMap<String, (Verdict, Option<String>)>) -> Result<()> {
    let cfg = &fx.config;
    let bad = |k: &str| Error::SafeTensors(format!("{}: config.{k} missing or mistyped", fx.name));
    let normalized_shape = usizes(&cfg["normalized_shape"]).ok_or_else(|| bad("normalized_shape"))?;
    // `eps: null` is PyTorch's default (2^-23).
    let eps = match &cfg["eps"] {
        serde_json::Value::Null => None,
        v => Some(v.as_f64().ok_or_else(|| bad("eps"))? as f32),
    };
    let config = RmsNormConfig {
        normalized_shape,
        eps,
        elementwise_affine: cfg["elementwise_affine"]
            .as_bool()
            .ok_or_else(|| bad("elementwise_affine"))?,
    };
    let note = f16_note(ctx, fx);
    let mut run = || -> Result<RmsNorm> {
        let mut rms = RmsNorm::with_config(ctx, config.clone())?;
        if config.elementwise_affine {
            rms.set_weight(&f32_input(fx, "weight")?.0)?;
        }
        let y = rms
            .forward(&activation(ctx, fx, "x")?)
            .and_then(|y| y.to_f64_blocking(ctx));
        out.insert("y".into(), (judge(fx, "y", y)?, note.clone()));
        Ok(rms)
    };
    match run() {
        Ok(mut rms) => {
            let saved = rms.saved().expect("a successful forward saves its statistics").clone();
            out.insert(
                "rstd".into(),
                (judge(fx, "rstd", saved.rstd.to_f64_blocking(ctx))?, note.clone()),
            );
            let grads = activation(ctx, fx, "dy").and_then(|dy| rms.backward(&dy));
            judge_grads(ctx, fx, out, grads.map(|g| [Some(g.dx), g.dweight, g.dbias]), &note)?;
        }
        Err(e) => {
            fail_remaining(fx, out, &e);
        }
    }
    Ok(())
}

fn check_group_norm(ctx: &Context, fx: &Fixture, out: &mut BTreeMap<String, (Verdict, Option<String>)>) -> Result<()> {
    let cfg = &fx.config;
    let bad = |k: &str| Error::SafeTensors(format!("{}: config.{k} missing or mistyped", fx.name));
    let count = |k: &str| {
        cfg[k]
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| bad(k))
    };
    let config = GroupNormConfig {
        num_groups: count("num_groups")?,
        num_channels: count("num_channels")?,
        eps: cfg["eps"].as_f64().ok_or_else(|| bad("eps"))? as f32,
        affine: cfg["affine"].as_bool().ok_or_else(|| bad("affine"))?,
    };
    let note = f16_note(ctx, fx);
    let mut run = || -> Result<GroupNorm> {
        let mut gn = GroupNorm::with_config(ctx, config.clone())?;
        if config.affine {
            gn.set_weight(&f32_input(fx, "weight")?.0)?;
            gn.set_bias(&f32_input(fx, "bias")?.0)?;
        }
        let y = gn
            .forward(&activation(ctx, fx, "x")?)
            .and_then(|y| y.to_f64_blocking(ctx));
        out.insert("y".into(), (judge(fx, "y", y)?, note.clone()));
        Ok(gn)
    };
    match run() {
        Ok(mut gn) => {
            let saved = gn.saved().expect("a successful forward saves its statistics").clone();
            for (name, t) in [("mean", &saved.mean), ("rstd", &saved.rstd)] {
                out.insert(name.into(), (judge(fx, name, t.to_f64_blocking(ctx))?, note.clone()));
            }
            let grads = activation(ctx, fx, "dy").and_then(|dy| gn.backward(&dy));
            judge_grads(ctx, fx, out, grads.map(|g| [Some(g.dx), g.dweight, g.dbias]), &note)?;
        }
        Err(e) => {
            fail_remaining(fx, out, &e);
        }
    }
    Ok(())
}

/// Fails every expected tensor of `fx` that has no verdict yet with the error `e` that stopped
/// the run.
fn fail_remaining(fx: &Fixture, out: &mut BTreeMap<String, (Verdict, Option<String>)>, e: &Error) {
    for name in fx.expected_names() {
        out.entry(name)
            .or_insert_with(|| (Verdict::Fail(format!("error: {e}")), None));
    }
}

/// Any numeric safetensors view widened to f64 (the fixture reader's common currency).
fn view_to_f64(name: &str, view: &TensorView<'_>) -> Result<Vec<f64>> {
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes"))))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64)
            .collect(),
        other => return Err(Error::SafeTensors(format!("`{name}` has unsupported dtype {other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::compare;

    #[test]
    fn rule_scales_atol_by_largest_expected() {
        // max|exp| = 100, so atol 1e-3 allows 0.1 everywhere.
        let c = compare(&[0.09, 100.0], &[0.0, 100.0], 0.0, 1e-3);
        assert!(c.passed);
        let c = compare(&[0.11, 100.0], &[0.0, 100.0], 0.0, 1e-3);
        assert!(!c.passed);
        assert!((c.max_abs_err - 0.11).abs() < 1e-12);
    }

    #[test]
    fn nan_and_length_mismatch_fail() {
        assert!(!compare(&[f64::NAN], &[0.0], 1.0, 1.0).passed);
        assert!(!compare(&[0.0], &[0.0, 0.0], 1.0, 1.0).passed);
    }
}
