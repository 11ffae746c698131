//! `normdrop selftest`: every op and every path this device can take, against the f64 CPU
//! reference, on awkward shapes; dropout masks bit for bit against the CPU spec; the PyTorch
//! fixtures. One line per check, then `N passed, M failed, K skipped`.
//!
//! Paths are reached through device variants opened on the same adapter (the device as it is;
//! without `SUBGROUP`; without `SHADER_INT64`; f16 packed in u32 even with `SHADER_F16`; storage
//! bindings cut to 64 KiB so tensors span several bindings) and through BatchNorm's two reduce
//! splits. A variant the device cannot make (a feature it lacks) is a skip that says so.

use std::path::PathBuf;

use normdrop::rng::{self, DropRule};
use normdrop::tuning::{LayerNormPlanOptions, ReduceSplit};
use normdrop::{wgpu, Context, ContextOptions, DType, DropoutConfig, Result, Tensor};

use crate::fixture::{self, Fixture, Verdict};
use crate::runners::{validate_with, Family, Variation, OPS};

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// More shapes, both reduce splits on every variant, larger masks.
    pub thorough: bool,
    /// Read the fixtures from this folder instead of the copies built into the binary.
    pub fixtures: Option<PathBuf>,
    /// Run only the checks whose line contains this text (`None`: all).
    pub filter: Option<String>,
}

impl Options {
    /// Whether the check named `name` runs.
    fn wants(&self, name: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| name.contains(f))
    }
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Right; the string says how close.
    Pass(String),
    /// Wrong or failed to run; the string says how.
    Fail(String),
    /// Not run: the device lacks what the check needs, named in the string.
    Skip(String),
}

/// One check's line.
#[derive(Clone, Debug)]
pub struct Check {
    /// What was checked: variant, op, dtype, shape.
    pub name: String,
    /// How it went.
    pub outcome: Outcome,
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Outcome::Pass(how) => write!(f, "{:<72} ok       {how}", self.name),
            Outcome::Fail(why) => write!(f, "{:<72} FAILED   {why}", self.name),
            Outcome::Skip(why) => write!(f, "{:<72} skipped  {why}", self.name),
        }
    }
}

/// Counts of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Checks that passed.
    pub passed: usize,
    /// Checks that failed.
    pub failed: usize,
    /// Checks skipped for a missing feature.
    pub skipped: usize,
}

/// The fixtures built into the binary: every file of `tests/fixtures/torch`.
const BUILT_IN_FIXTURES: &[(&str, &[u8])] = &[
    (
        "bn1d_train_nc",
        include_bytes!("../../tests/fixtures/torch/bn1d_train_nc.safetensors"),
    ),
    (
        "bn2d_eval",
        include_bytes!("../../tests/fixtures/torch/bn2d_eval.safetensors"),
    ),
    (
        "bn2d_no_running_stats_eval",
        include_bytes!("../../tests/fixtures/torch/bn2d_no_running_stats_eval.safetensors"),
    ),
    (
        "bn2d_train_3steps_momentum",
        include_bytes!("../../tests/fixtures/torch/bn2d_train_3steps_momentum.safetensors"),
    ),
    (
        "bn2d_train_basic",
        include_bytes!("../../tests/fixtures/torch/bn2d_train_basic.safetensors"),
    ),
    (
        "bn2d_train_cumulative_avg",
        include_bytes!("../../tests/fixtures/torch/bn2d_train_cumulative_avg.safetensors"),
    ),
    (
        "bn2d_train_f16",
        include_bytes!("../../tests/fixtures/torch/bn2d_train_f16.safetensors"),
    ),
    (
        "bn2d_train_no_affine",
        include_bytes!("../../tests/fixtures/torch/bn2d_train_no_affine.safetensors"),
    ),
    (
        "bn2d_train_offset",
        include_bytes!("../../tests/fixtures/torch/bn2d_train_offset.safetensors"),
    ),
    (
        "ln_basic",
        include_bytes!("../../tests/fixtures/torch/ln_basic.safetensors"),
    ),
    (
        "ln_f16",
        include_bytes!("../../tests/fixtures/torch/ln_f16.safetensors"),
    ),
    (
        "ln_multi_dim",
        include_bytes!("../../tests/fixtures/torch/ln_multi_dim.safetensors"),
    ),
    (
        "ln_no_affine",
        include_bytes!("../../tests/fixtures/torch/ln_no_affine.safetensors"),
    ),
    (
        "ln_no_bias",
        include_bytes!("../../tests/fixtures/torch/ln_no_bias.safetensors"),
    ),
    (
        "ln_odd_width",
        include_bytes!("../../tests/fixtures/torch/ln_odd_width.safetensors"),
    ),
    (
        "ln_offset",
        include_bytes!("../../tests/fixtures/torch/ln_offset.safetensors"),
    ),
    ("gn_1d", include_bytes!("../../tests/fixtures/torch/gn_1d.safetensors")),
    (
        "gn_basic",
        include_bytes!("../../tests/fixtures/torch/gn_basic.safetensors"),
    ),
    (
        "gn_f16",
        include_bytes!("../../tests/fixtures/torch/gn_f16.safetensors"),
    ),
    (
        "gn_instance",
        include_bytes!("../../tests/fixtures/torch/gn_instance.safetensors"),
    ),
    (
        "gn_no_affine",
        include_bytes!("../../tests/fixtures/torch/gn_no_affine.safetensors"),
    ),
    (
        "gn_offset",
        include_bytes!("../../tests/fixtures/torch/gn_offset.safetensors"),
    ),
    (
        "gn_one_group",
        include_bytes!("../../tests/fixtures/torch/gn_one_group.safetensors"),
    ),
    (
        "rms_basic",
        include_bytes!("../../tests/fixtures/torch/rms_basic.safetensors"),
    ),
    (
        "rms_eps_default",
        include_bytes!("../../tests/fixtures/torch/rms_eps_default.safetensors"),
    ),
    (
        "rms_f16",
        include_bytes!("../../tests/fixtures/torch/rms_f16.safetensors"),
    ),
    (
        "rms_llama_like",
        include_bytes!("../../tests/fixtures/torch/rms_llama_like.safetensors"),
    ),
    (
        "rms_multi_dim",
        include_bytes!("../../tests/fixtures/torch/rms_multi_dim.safetensors"),
    ),
    (
        "rms_no_affine",
        include_bytes!("../../tests/fixtures/torch/rms_no_affine.safetensors"),
    ),
    (
        "rms_odd_width",
        include_bytes!("../../tests/fixtures/torch/rms_odd_width.safetensors"),
    ),
];

/// A device variant: a name and how to open it on the adapter of the context under test.
struct Variant {
    name: &'static str,
    /// The options, or why the device cannot make this variant.
    options: std::result::Result<ContextOptions, String>,
}

fn variants(ctx: &Context) -> Vec<Variant> {
    let info = ctx.adapter_info();
    let base = ContextOptions {
        backends: Some(wgpu::Backends::from(info.backend)),
        adapter_name: Some(info.name.clone()),
        ..Default::default()
    };
    let has = |f: wgpu::Features| ctx.features().contains(f);
    let without = |f: wgpu::Features, name: &str| {
        if has(f) {
            Ok(ContextOptions {
                disabled_features: f,
                ..base.clone()
            })
        } else {
            Err(format!(
                "the device has no {name}: the default variant ran its fallback"
            ))
        }
    };
    vec![
        Variant {
            name: "no-subgroup",
            options: without(wgpu::Features::SUBGROUP, "SUBGROUP"),
        },
        Variant {
            name: "no-int64",
            options: without(wgpu::Features::SHADER_INT64, "SHADER_INT64"),
        },
        Variant {
            name: "packed-f16",
            options: if has(wgpu::Features::SHADER_F16) {
                Ok(ContextOptions {
                    force_packed_f16: true,
                    ..base.clone()
                })
            } else {
                Err("the device has no SHADER_F16: the default variant stored f16 packed".into())
            },
        },
        Variant {
            name: "bindings-64KiB",
            options: Ok(ContextOptions {
                limits: Some(wgpu::Limits {
                    max_storage_buffer_binding_size: 64 << 10,
                    ..ctx.limits()
                }),
                ..base
            }),
        },
    ]
}

/// Awkward shapes per family: M = 2, primes, widths off multiples of 4 and of subgroup sizes,
/// rows wider than the register paths, C = 1 with a large M, more than 65535 workgroups. With
/// `chunked` (storage bindings of 64 KiB), shapes larger than one binding whose sample or row
/// block still fits in one (the documented limit of a split call).
fn shapes(family: Family, thorough: bool, chunked: bool) -> Vec<Vec<usize>> {
    if chunked {
        return match family {
            Family::BatchNorm => vec![vec![2, 3], vec![80, 3, 175], vec![33, 7, 61]],
            Family::LayerNorm => vec![vec![2, 2], vec![7, 257], vec![700, 101], vec![333, 64]],
            Family::Dropout => vec![vec![100_003], vec![50_021]],
            // Groups of 528 and 3000 elements in calls of 528 KiB and 70 KiB (a range starts at
            // an aligned offset, so 3001 would need 8 groups in one 64 KiB binding).
            Family::GroupNorm => vec![vec![2, 6, 5], vec![8, 64, 33, 8], vec![3, 2, 3000]],
        };
    }
    let mut out: Vec<Vec<usize>> = match family {
        Family::BatchNorm => vec![vec![2, 3], vec![3, 5, 7, 11], vec![4, 1, 3001]],
        Family::LayerNorm => vec![vec![2, 2], vec![7, 257], vec![3, 1027], vec![5, 4099]],
        Family::Dropout => vec![vec![100_003]],
        // G = gcd(C, 32): 2 groups of 3 × 5; G = C = 32 over 7 × 11; G = 1 over 3 × 3001; two
        // elements per group without spatial dims.
        Family::GroupNorm => vec![vec![2, 6, 5], vec![3, 32, 7, 11], vec![1, 3, 3001], vec![4, 64]],
    };
    if thorough {
        match family {
            Family::BatchNorm => {
                out.extend([
                    vec![2, 70_000],
                    vec![1, 1, 1 << 17],
                    vec![8, 64, 13, 13],
                    vec![5, 33, 129],
                ]);
            }
            Family::LayerNorm => {
                out.extend([
                    vec![70_000, 4],
                    vec![9, 768],
                    vec![4, 1000],
                    vec![3, 20_011],
                    vec![129, 33],
                ]);
            }
            Family::Dropout => out.extend([vec![(1 << 24) + 12_345], vec![5], vec![65]]),
            // One group of 2^20 elements; the diffusion layers' 320 channels in 32 groups.
            Family::GroupNorm => out.extend([vec![1, 1, 1 << 20], vec![2, 320, 9, 9]]),
        }
    }
    out
}

/// Dropout2d takes `(N, C, *)`: the BatchNorm-family shapes.
fn family_shapes(name: &str, family: Family, thorough: bool, chunked: bool) -> Vec<Vec<usize>> {
    let shapes = shapes(family, thorough, chunked);
    if name.starts_with("dropout2d") {
        shapes.into_iter().filter(|s| s.len() >= 2).collect()
    } else {
        shapes
    }
}

fn shape_text(shape: &[usize]) -> String {
    shape.iter().map(usize::to_string).collect::<Vec<_>>().join("x")
}

fn outcome_of(r: Result<crate::fixture::Comparison>) -> Outcome {
    match r {
        Ok(c) if c.passed => Outcome::Pass(format!(
            "max_abs_err {:.2e} ({:.0}% of tolerance)",
            c.max_abs_err,
            100.0 * c.worst_ratio
        )),
        Ok(c) => Outcome::Fail(format!(
            "max_abs_err {:.3e}, {:.1}× the tolerance",
            c.max_abs_err, c.worst_ratio
        )),
        // A geometry the device cannot run (a forced row-per-subgroup pass without SUBGROUP).
        Err(e @ normdrop::Error::Unsupported { .. }) => Outcome::Skip(e.to_string()),
        Err(e) => Outcome::Fail(e.to_string()),
    }
}

/// Whether the quick run checks `op` in `dtype` on `variant`: what the variant changes
/// (packed f16 storage: f16 activations; no SHADER_INT64: the Philox draws of the dropout ops).
/// `--thorough` checks everything everywhere.
fn relevant(variant: &str, thorough: bool, op: &str, dtype: DType) -> bool {
    thorough
        || match variant {
            "packed-f16" => dtype == DType::F16,
            "no-int64" => op.contains("dropout"),
            _ => true,
        }
}

/// Every op at every shape and dtype on `ctx`, labelled `variant`.
fn ops_on(ctx: &Context, variant: &str, options: &Options, chunked: bool, report: &mut dyn FnMut(Check)) {
    let dtypes = [DType::F32, DType::F16];
    for spec in OPS {
        for shape in family_shapes(spec.name, spec.family, options.thorough, chunked) {
            for dtype in dtypes {
                let name = format!("{variant:<15} {:<37} {dtype} {}", spec.name, shape_text(&shape));
                if !options.wants(&name) || !relevant(variant, options.thorough, spec.name, dtype) {
                    continue;
                }
                let outcome = outcome_of(validate_with(ctx, spec.name, &shape, dtype, &Variation::default()));
                report(Check { name, outcome });
            }
        }
    }
    // BatchNorm's reduce splits forced both ways, and off-centre data (f32: f16 cannot hold
    // 1000 + small noise).
    // Shapes that fill every subgroup of the 256-invocation workgroups: chunks of 4096 (every
    // invocation reads 4 quads), and 301 chunks of 256 per channel (the finalize pass merges
    // partials across the whole workgroup). Their samples fit the 64 KiB variant's bindings.
    let splits: &[(&str, ReduceSplit, &[usize])] = &[
        (
            "split=workgroup/4096",
            ReduceSplit::Workgroup { chunk: 4096 },
            &[40, 2, 1024],
        ),
        (
            "split=workgroup/256",
            ReduceSplit::Workgroup { chunk: 256 },
            &[301, 1, 256],
        ),
        (
            "split=invocation/64",
            ReduceSplit::Invocation { chunk: 64 },
            &[3, 5, 7, 11],
        ),
    ];
    // GroupNorm's reductions are BatchNorm's on its group views: the same splits.
    let bn_ops: Vec<_> = OPS
        .iter()
        .filter(|o| o.name.starts_with("batch_norm") || o.family == Family::GroupNorm)
        .collect();
    for (label, split, shape) in splits {
        for spec in &bn_ops {
            let name = format!("{variant:<15} {:<37} f32 {} {label}", spec.name, shape_text(shape));
            if !options.wants(&name) || !relevant(variant, options.thorough, spec.name, DType::F32) {
                continue;
            }
            let v = Variation {
                split: Some(*split),
                ..Default::default()
            };
            report(Check {
                name,
                outcome: outcome_of(validate_with(ctx, spec.name, shape, DType::F32, &v)),
            });
        }
    }
    // LayerNorm's geometries forced: the row-block path (1 lane per row) with and without the
    // row-per-subgroup passes, and the lane paths at 4, 32 and 256 lanes per row, at widths
    // off a multiple of 4, at the register paths' limit (768) and past it.
    let geometries: &[(&str, Option<u32>, Option<bool>)] = &[
        ("lanes=1 subgroup-rows=off", Some(1), Some(false)),
        ("lanes=1 subgroup-rows=on", Some(1), Some(true)),
        ("lanes=4", Some(4), Some(false)),
        ("lanes=32", Some(32), Some(false)),
        ("lanes=256", Some(256), Some(false)),
    ];
    let ln_ops: Vec<_> = OPS.iter().filter(|o| o.family == Family::LayerNorm).collect();
    // With 64 KiB bindings the backward's 64-row blocks must fit one binding (width ≤ 256).
    let mut geometry_shapes: Vec<Vec<usize>> = if chunked {
        vec![vec![37, 130], vec![300, 256], vec![500, 64]]
    } else {
        vec![vec![37, 130], vec![70, 768], vec![9, 1000], vec![33, 64]]
    };
    // The quick run forces every geometry at every shape on the device as it is, and at one
    // width off a multiple of 4 and one multiple of 4 on the variants (`--thorough`: all).
    if !options.thorough && variant != "default" {
        geometry_shapes.retain(|s| s[1] == 130 || s[1] == 64);
    }
    for (label, lanes, subgroup_rows) in geometries {
        // The row-per-subgroup passes take widths that are multiples of 4 up to 768; where a
        // device cannot run them at all, the check is a skip naming why.
        let fits = |w: usize| *subgroup_rows != Some(true) || (w.is_multiple_of(4) && w <= 768);
        for spec in &ln_ops {
            for shape in geometry_shapes.iter().filter(|s| fits(s[1])) {
                let name = format!("{variant:<15} {:<37} f32 {} {label}", spec.name, shape_text(shape));
                if !options.wants(&name) || !relevant(variant, options.thorough, spec.name, DType::F32) {
                    continue;
                }
                let v = Variation {
                    layer_norm: LayerNormPlanOptions {
                        lanes: *lanes,
                        subgroup_rows: *subgroup_rows,
                    },
                    ..Default::default()
                };
                report(Check {
                    name,
                    outcome: outcome_of(validate_with(ctx, spec.name, shape, DType::F32, &v)),
                });
            }
        }
    }
    for spec in OPS.iter().filter(|o| o.family != Family::Dropout) {
        let shape = match spec.family {
            Family::BatchNorm => vec![4, 3, 33],
            Family::GroupNorm => vec![4, 6, 33],
            _ => vec![9, 130],
        };
        let name = format!("{variant:<15} {:<37} f32 {} offset=1000", spec.name, shape_text(&shape));
        if !options.wants(&name) || !relevant(variant, options.thorough, spec.name, DType::F32) {
            continue;
        }
        let v = Variation {
            offset: 1000.0,
            ..Default::default()
        };
        report(Check {
            name,
            outcome: outcome_of(validate_with(ctx, spec.name, &shape, DType::F32, &v)),
        });
    }
}

/// The packed keep mask of Dropout (and Dropout2d's channel mask) equals the CPU spec bit for
/// bit, for several seeds and offsets; the keep rate is within 5σ of 1 − p.
fn masks(ctx: &Context, options: &Options, report: &mut dyn FnMut(Check)) {
    let n = if options.thorough { 1_000_003 } else { 100_003 };
    for (seed, offset, p) in [
        (0u64, 0u64, 0.5),
        (1234, 7, 0.1),
        (u64::MAX, u64::MAX - 1, 0.9),
        (42, 1 << 33, 0.3),
    ] {
        let name = format!("{:<15} dropout mask seed={seed} offset={offset} p={p} n={n}", "masks");
        if !options.wants(&name) {
            continue;
        }
        let outcome = (|| -> Result<Outcome> {
            let mut d = normdrop::Dropout::with_config(ctx, DropoutConfig::new(p), seed)?;
            d.set_state(seed, offset);
            let x = Tensor::from_slice(ctx, &vec![1.0f32; n], &[n])?;
            let (_, mask) = d.forward_with_mask(&x)?;
            let got = mask.to_bools_blocking(ctx)?;
            let expected = rng::mask(seed, offset, n, DropRule::new(p)?);
            if let Some(i) = got.iter().zip(&expected).position(|(a, b)| a != b) {
                return Ok(Outcome::Fail(format!("bit {i} differs from the CPU spec")));
            }
            let kept = got.iter().filter(|&&k| k).count() as f64;
            let (mean, sd) = (n as f64 * (1.0 - p), (n as f64 * p * (1.0 - p)).sqrt());
            let z = (kept - mean) / sd;
            Ok(if z.abs() <= 5.0 {
                Outcome::Pass(format!("bit-exact; keep rate {:.4} ({z:+.1}σ)", kept / n as f64))
            } else {
                Outcome::Fail(format!("keep rate {:.4} is {z:+.1}σ from {}", kept / n as f64, 1.0 - p))
            })
        })()
        .unwrap_or_else(|e| Outcome::Fail(e.to_string()));
        report(Check { name, outcome });
    }
}

/// Every PyTorch fixture, one check per expected tensor.
fn fixtures(ctx: &Context, options: &Options, report: &mut dyn FnMut(Check)) {
    let images: Vec<(String, std::result::Result<Vec<u8>, String>)> = match &options.fixtures {
        None => BUILT_IN_FIXTURES
            .iter()
            .map(|(n, b)| (n.to_string(), Ok(b.to_vec())))
            .collect(),
        Some(dir) => match std::fs::read_dir(dir) {
            Ok(entries) => {
                let mut paths: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                paths.sort();
                paths
                    .into_iter()
                    .map(|p| {
                        let name = p
                            .file_stem()
                            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
                        (name, std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display())))
                    })
                    .collect()
            }
            Err(e) => vec![(dir.display().to_string(), Err(e.to_string()))],
        },
    };
    for (name, bytes) in images {
        let label = format!("{:<15} {name}", "fixture");
        if !options.wants(&label) {
            continue;
        }
        let lines = bytes
            .map_err(|e| normdrop::Error::invalid("selftest", e))
            .and_then(|b| Fixture::from_bytes(&name, &b))
            .and_then(|fx| fixture::check(ctx, &fx));
        match lines {
            Err(e) => report(Check {
                name: label,
                outcome: Outcome::Fail(e.to_string()),
            }),
            Ok(lines) => {
                for line in lines {
                    let outcome = match line.verdict {
                        Verdict::Pass(c) => Outcome::Pass(format!(
                            "max_abs_err {:.2e} ({:.0}% of tolerance)",
                            c.max_abs_err,
                            100.0 * c.worst_ratio
                        )),
                        Verdict::Fail(why) => Outcome::Fail(why),
                        // A fixture tensor this version does not compute is a failure of the
                        // selftest, not a missing feature.
                        Verdict::Skip(why) => Outcome::Fail(format!("not computed: {why}")),
                    };
                    report(Check {
                        name: format!("{label} {}", line.tensor),
                        outcome,
                    });
                }
            }
        }
    }
}

/// Runs the whole selftest on `ctx`'s adapter, calling `report` once per check as it finishes.
pub fn run(ctx: &Context, options: &Options, report: &mut dyn FnMut(&Check)) -> Summary {
    let mut summary = Summary::default();
    let mut tally = |c: Check| {
        match c.outcome {
            Outcome::Pass(_) => summary.passed += 1,
            Outcome::Fail(_) => summary.failed += 1,
            Outcome::Skip(_) => summary.skipped += 1,
        }
        report(&c);
    };
    ops_on(ctx, "default", options, false, &mut tally);
    for v in variants(ctx) {
        match v.options.map(Context::with_options_blocking) {
            Ok(Ok(vctx)) => ops_on(&vctx, v.name, options, v.name == "bindings-64KiB", &mut tally),
            Ok(Err(e)) => tally(Check {
                name: format!("{:<15} (device)", v.name),
                outcome: Outcome::Fail(format!("could not open the variant: {e}")),
            }),
            Err(why) => {
                let name = format!("{:<15} (every op)", v.name);
                if options.filter.is_none() {
                    tally(Check {
                        name,
                        outcome: Outcome::Skip(why),
                    });
                }
            }
        }
    }
    masks(ctx, options, &mut tally);
    fixtures(ctx, options, &mut tally);
    summary
}
