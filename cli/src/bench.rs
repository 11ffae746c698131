//! `normdrop bench`: validate every op against the CPU reference, measure this adapter's copy
//! bandwidth, then time every op and report median/p20/p80, GB/s by the minimal-bytes formula,
//! the percentage of copy bandwidth, and fused speedups.

use std::collections::BTreeMap;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use normdrop::kernels::CopyGrain;
use normdrop::{Context, Error};
use normdrop_cli::runners::{self, Family, OPS};
use serde::{Deserialize, Serialize};

/// Options of `normdrop bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Small shapes that finish in under a minute on a CPU driver (lavapipe). The default when
    /// the adapter is a CPU device.
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// The full preset (ResNet-50 BatchNorm layers, transformer LayerNorms, 16M/64M dropout),
    /// the default on GPUs.
    #[arg(long)]
    full: bool,
    /// Only these ops (comma-separated names; see the header for the list).
    #[arg(long, value_delimiter = ',')]
    ops: Vec<String>,
    /// BatchNorm / Dropout2d shapes, e.g. 32x64x112x112 (repeatable; replaces the preset's).
    #[arg(long = "bn", value_parser = parse_shape)]
    bn: Vec<Vec<usize>>,
    /// LayerNorm shapes ROWSxWIDTH, e.g. 8192x768 (repeatable).
    #[arg(long = "ln", value_parser = parse_shape)]
    ln: Vec<Vec<usize>>,
    /// GroupNorm shapes `NxCx…`, e.g. 8x320x64x64, normalized in gcd(C, 32) groups
    /// (repeatable).
    #[arg(long = "gn", value_parser = parse_shape)]
    gn: Vec<Vec<usize>>,
    /// Dropout element counts, e.g. 16777216 (repeatable).
    #[arg(long = "dropout", value_parser = parse_shape)]
    dropout: Vec<Vec<usize>>,
    /// Activation dtype: f32, or f16 (native shader-f16 where the adapter has it, else packed
    /// in u32; `normdrop --packed-f16 bench --dtype f16` forces packed). Parameters and
    /// statistics stay f32; minimal bytes count activations at their own size.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: normdrop::DType,
    /// Timed samples per row (default: 15 quick, 20 full).
    #[arg(long)]
    samples: Option<usize>,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Add a column with the speed ratio against an earlier `--json` file.
    #[arg(long)]
    baseline: Option<PathBuf>,
}

fn parse_dtype(s: &str) -> Result<normdrop::DType, String> {
    match s {
        "f32" => Ok(normdrop::DType::F32),
        "f16" => Ok(normdrop::DType::F16),
        _ => Err(format!("{s:?}: expected f32 or f16")),
    }
}

/// Largest element count a shape may have: the kernels index elements with u32 and reject more
/// than 2^31; checking here keeps the bench from allocating host buffers for a shape no kernel
/// would take.
const MAX_ELEMENTS: u64 = 1 << 31;

/// A shape `AxBx…` of positive dimensions whose element count is at most [`MAX_ELEMENTS`].
fn parse_shape(s: &str) -> Result<Vec<usize>, String> {
    let dims = s
        .split('x')
        .map(|d| d.trim().parse::<usize>().map_err(|e| format!("{s:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if dims.contains(&0) {
        return Err(format!("{s:?}: every dimension must be at least 1"));
    }
    let elements = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
    match elements {
        Some(n) if n <= MAX_ELEMENTS => Ok(dims),
        _ => Err(format!("{s:?}: more than 2^31 elements")),
    }
}

/// One row of results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    op: String,
    shape: Vec<usize>,
    median_us: f64,
    p20_us: f64,
    p80_us: f64,
    gb_per_s: f64,
    /// The median over the row's pairs of 100 × (the op's GB/s ÷ the copy's GB/s in the same
    /// pair) (older reports: against `copy_gb_per_s`).
    pct_of_copy: f64,
    fused_speedup: Option<f64>,
    /// The median of the copy's bandwidth over the row's pairs (older reports: the mean of the
    /// copy measured just before and just after the row, or nothing).
    #[serde(default)]
    copy_gb_per_s: f64,
    /// (op µs, copy µs) of every timed pair: a sample of the op, then at once a sample of the
    /// copy. The row's median, p20 and p80 are the op's. Older reports lack them.
    #[serde(default)]
    pairs_us: Vec<[f64; 2]>,
}

/// The whole report, as `--json` writes it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    adapter: String,
    backend: String,
    clock: String,
    preset: String,
    /// Activation storage: `f32`, `f16` (native) or `f16-packed`. Older reports lack it.
    #[serde(default)]
    storage: String,
    /// The median of `copy_runs_gb_per_s` (older reports: the yardstick of every row).
    copy_gb_per_s: f64,
    /// The copy's bandwidth, in order: the chosen grain's first measurement, then each row's
    /// `copy_gb_per_s` (older reports: before the first row and after every row, or before
    /// and after the ops, or nothing).
    #[serde(default)]
    copy_runs_gb_per_s: Vec<f64>,
    copy_bytes: u64,
    /// Quads per invocation of the copy used as the yardstick (older reports: 1, the only
    /// grain then).
    #[serde(default = "one_quad")]
    copy_quads_per_invocation: u64,
    /// Each copy grain's bandwidth measured at the start, from which the faster was chosen
    /// (older reports: none).
    #[serde(default)]
    copy_grains: Vec<CopyGrainRun>,
    rows: Vec<Row>,
}

fn one_quad() -> u64 {
    1
}

/// One copy grain's first measurement.
#[derive(Debug, Serialize, Deserialize)]
pub struct CopyGrainRun {
    quads_per_invocation: u64,
    gb_per_s: f64,
}

/// One op's timing: median, p20, p80 (seconds per call) and its minimal bytes.
struct Timed {
    med: f64,
    p20: f64,
    p80: f64,
    bytes: u64,
}

struct Preset {
    name: &'static str,
    bn: Vec<Vec<usize>>,
    ln: Vec<Vec<usize>>,
    gn: Vec<Vec<usize>>,
    dropout: Vec<Vec<usize>>,
    samples: usize,
    per_sample: usize,
}

fn preset(quick: bool) -> Preset {
    if quick {
        Preset {
            name: "quick",
            bn: vec![vec![8, 64, 28, 28]],
            ln: vec![vec![1024, 768]],
            gn: vec![vec![8, 64, 28, 28]],
            dropout: vec![vec![1 << 20]],
            samples: 15,
            per_sample: 1,
        }
    } else {
        Preset {
            name: "full",
            bn: vec![
                vec![32, 64, 112, 112],
                vec![32, 256, 56, 56],
                vec![32, 512, 28, 28],
                vec![32, 2048, 7, 7],
            ],
            ln: vec![vec![8192, 768], vec![4096, 4096], vec![16384, 1024]],
            // Diffusion models' GroupNorm (G = 32).
            gn: vec![vec![8, 320, 64, 64]],
            dropout: vec![vec![1 << 24], vec![1 << 26]],
            samples: 20,
            per_sample: 10,
        }
    }
}

fn fmt_shape(shape: &[usize]) -> String {
    shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}

/// Runs the benchmark; returns whether validation passed.
pub fn run(ctx: &Context, args: BenchArgs) -> normdrop::Result<bool> {
    let info = ctx.adapter_info();
    let cpu = info.device_type == normdrop::wgpu::DeviceType::Cpu;
    let quick = args.quick || (!args.full && cpu);
    let mut p = preset(quick);
    for (custom, slot) in [
        (&args.bn, &mut p.bn),
        (&args.ln, &mut p.ln),
        (&args.gn, &mut p.gn),
        (&args.dropout, &mut p.dropout),
    ] {
        if !custom.is_empty() {
            slot.clone_from(custom);
        }
    }
    let samples = args.samples.unwrap_or(p.samples).max(1);
    for name in &args.ops {
        runners::spec(name)?;
    }
    let selected: Vec<&runners::OpSpec> = OPS
        .iter()
        .filter(|o| args.ops.is_empty() || args.ops.iter().any(|n| n == o.name))
        .collect();
    let shapes_of = |f: Family| match f {
        Family::BatchNorm => &p.bn,
        Family::LayerNorm => &p.ln,
        Family::Dropout => &p.dropout,
        Family::GroupNorm => &p.gn,
    };
    let jobs: Vec<(&runners::OpSpec, Vec<usize>)> = selected
        .iter()
        .flat_map(|o| shapes_of(o.family).iter().map(move |s| (*o, s.clone())))
        .collect();

    println!(
        "normdrop bench: {} ({:?}, {:?}), preset {}{}",
        info.name,
        info.backend,
        info.device_type,
        p.name,
        if cpu && !args.full { " (CPU adapter)" } else { "" }
    );
    println!(
        "timing: {}; {samples} samples of {} call(s) after warm-up; inputs rotated through up to 4 copies; every op sample paired with a sample of the vec4 copy taken right after it",
        runners::clock(ctx),
        p.per_sample
    );
    println!(
        "minimal bytes (E elements, s = {} bytes: {}): {}",
        args.dtype.size(),
        match ctx.storage(args.dtype) {
            normdrop::Storage::F32 => "f32",
            normdrop::Storage::F16 => "f16, native shader-f16",
            normdrop::Storage::F16Packed => "f16 packed in u32",
        },
        OPS.iter()
            .map(|o| format!("{} {}Es", o.name, o.passes))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("fused speedup: time of the unfused sequence at the same shape ÷ time of the fused op");

    // 1. Validate every op on a smaller copy of each shape.
    let bar = progress(jobs.len() as u64, "validating");
    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    for (spec, shape) in &jobs {
        let small = runners::validation_shape(ctx, spec.family, shape);
        bar.set_message(format!("{} {}", spec.name, fmt_shape(&small)));
        match runners::validate_as(ctx, spec.name, &small, args.dtype) {
            Ok(c) if c.passed => worst = worst.max(c.worst_ratio),
            Ok(c) => failures.push(format!(
                "{} {}: max_abs_err {:.3e} ({:.1}x tolerance)",
                spec.name,
                fmt_shape(&small),
                c.max_abs_err,
                c.worst_ratio
            )),
            Err(e) => failures.push(format!("{} {}: {e}", spec.name, fmt_shape(&small))),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if !failures.is_empty() {
        println!("validation FAILED against the CPU reference:");
        for f in &failures {
            println!("  {f}");
        }
        return Ok(false);
    }
    println!(
        "validation: all {} op/shape pairs match the CPU reference (worst at {:.1}% of tolerance)",
        jobs.len(),
        100.0 * worst
    );

    // 2. Copy bandwidth over the largest tensor of the run.
    let largest = jobs
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64 * 4)
        .max()
        .unwrap_or(1 << 22);
    // Every sample of a row's op is followed at once by a sample of the copy, and the row's
    // percentage is the median of the pairs' ratios: a shared machine's speed drifts within
    // seconds (lavapipe on a 2-core VM: 2-3x between runs of one binary), and the two samples of
    // a pair see the same moment, where separate measurements before and after a row need not.
    // The warm-up calls absorb the preceding op's cache state.
    let copy_bytes = largest.min(ctx.limits().max_storage_buffer_binding_size).max(1 << 20);
    let gbps_of = |runner: &runners::Runner| -> normdrop::Result<f64> {
        let (med, _, _) = runners::percentiles(&runners::time(ctx, runner, 2, samples, p.per_sample)?);
        Ok(runner.bytes as f64 / med / 1e9)
    };
    // The yardstick is the faster copy grain on this adapter (one quad per invocation on a GPU,
    // several on a CPU driver, whose per-invocation cost one quad does not amortise): each
    // grain measured once here, the faster one used for the run.
    let mut grains = Vec::new();
    for grain in CopyGrain::ALL {
        let runner = runners::copy_runner(ctx, copy_bytes, runners::rotation_sets(copy_bytes), grain)?;
        let gbps = gbps_of(&runner)?;
        grains.push((grain, gbps, runner));
    }
    let fastest = (0..grains.len())
        .max_by(|&a, &b| grains[a].1.total_cmp(&grains[b].1))
        .expect("two copy grains");
    let copy_grains: Vec<CopyGrainRun> = grains
        .iter()
        .map(|(grain, gbps, _)| CopyGrainRun {
            quads_per_invocation: grain.quads(),
            gb_per_s: *gbps,
        })
        .collect();
    let (copy_grain, first_gbps, copy) = grains.swap_remove(fastest);
    println!(
        "copy yardstick: vec4 copy, {} quad(s) per invocation, the faster grain here ({})",
        copy_grain.quads(),
        copy_grains
            .iter()
            .map(|g| format!("{} per invocation {:.2} GB/s", g.quads_per_invocation, g.gb_per_s))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut copy_runs = vec![first_gbps];

    // 3. Time every op; unfused sequences too, for the fused speedups.
    let baseline: Option<Report> = match &args.baseline {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                path: path.display().to_string(),
                source,
            })?;
            Some(serde_json::from_str(&text).map_err(|e| Error::InvalidArgument {
                op: "bench",
                reason: format!("baseline {}: {e}", path.display()),
            })?)
        }
        None => None,
    };
    let mut medians: BTreeMap<(String, Vec<usize>), f64> = BTreeMap::new();
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let bar = progress(jobs.len() as u64, "timing");
    // An op's runner at a shape, its inputs rotated as the tensor size asks.
    let runner_for = |name: &str, shape: &[usize]| -> normdrop::Result<runners::Runner> {
        let numel: u64 = shape.iter().map(|&d| d as u64).product();
        let size = args.dtype.size() as u64;
        runners::build_as(ctx, name, shape, runners::rotation_sets(numel * size), args.dtype)
    };
    // Median, p20 and p80 of an op's seconds per call; the median is kept for fused speedups.
    let timed = |name: &str,
                 shape: &[usize],
                 runner: &runners::Runner,
                 secs: &[f64],
                 medians: &mut BTreeMap<(String, Vec<usize>), f64>|
     -> Timed {
        let (med, p20, p80) = runners::percentiles(secs);
        medians.insert((name.to_string(), shape.to_vec()), med);
        Timed {
            med,
            p20,
            p80,
            bytes: runner.bytes,
        }
    };
    // An op alone (the parts of an unfused sequence).
    let time_op =
        |name: &str, shape: &[usize], medians: &mut BTreeMap<(String, Vec<usize>), f64>| -> normdrop::Result<Timed> {
            let runner = runner_for(name, shape)?;
            let secs = runners::time(ctx, &runner, 2, samples, p.per_sample)?;
            Ok(timed(name, shape, &runner, &secs, medians))
        };
    // A row's op, paired with the copy: (timing, the median of the pairs' percentages, the
    // median of the copy's GB/s, the pairs in µs).
    let time_row = |name: &str,
                    shape: &[usize],
                    medians: &mut BTreeMap<(String, Vec<usize>), f64>|
     -> normdrop::Result<(Timed, f64, f64, Vec<[f64; 2]>)> {
        let runner = runner_for(name, shape)?;
        let pairs = runners::time_paired(ctx, &runner, &copy, 2, samples, p.per_sample)?;
        let ops: Vec<f64> = pairs.iter().map(|&(t, _)| t).collect();
        let pcts: Vec<f64> = pairs
            .iter()
            .map(|&(t, c)| 100.0 * (runner.bytes as f64 / t) / (copy.bytes as f64 / c))
            .collect();
        let copies: Vec<f64> = pairs.iter().map(|&(_, c)| copy.bytes as f64 / c / 1e9).collect();
        let us = pairs.iter().map(|&(t, c)| [t * 1e6, c * 1e6]).collect();
        Ok((
            timed(name, shape, &runner, &ops, medians),
            runners::percentiles(&pcts).0,
            runners::percentiles(&copies).0,
            us,
        ))
    };
    for (spec, shape) in &jobs {
        bar.set_message(format!("{} {}", spec.name, fmt_shape(shape)));
        match time_row(spec.name, shape, &mut medians) {
            Ok((Timed { med, p20, p80, bytes }, pct_of_copy, copy_gb_per_s, pairs_us)) => {
                let gbps = bytes as f64 / med / 1e9;
                let mut fused_speedup = None;
                if !spec.unfused.is_empty() {
                    let mut total = 0.0;
                    for part in spec.unfused {
                        let key = (part.to_string(), shape.clone());
                        let t = match medians.get(&key) {
                            Some(&t) => t,
                            None => time_op(part, shape, &mut medians)?.med,
                        };
                        total += t;
                    }
                    fused_speedup = Some(total / med);
                }
                rows.push(Row {
                    op: spec.name.to_string(),
                    shape: shape.clone(),
                    median_us: med * 1e6,
                    p20_us: p20 * 1e6,
                    p80_us: p80 * 1e6,
                    gb_per_s: gbps,
                    pct_of_copy,
                    fused_speedup,
                    copy_gb_per_s,
                    pairs_us,
                });
                copy_runs.push(copy_gb_per_s);
            }
            Err(e) => skipped.push(format!("{} {}: {e}", spec.name, fmt_shape(shape))),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let copy_gbps = runners::percentiles(&copy_runs).0;
    let (low, high) = copy_runs
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(l, h), &g| (l.min(g), h.max(g)));
    println!(
        "copy bandwidth: {copy_gbps:.2} GB/s, the median of {} measurements (range {low:.2}–{high:.2}; vec4 copy of {:.1} MiB, read + write: the first, then each row's median, in the copy column); each row's % copy is the median of its pairs' ratios",
        copy_runs.len(),
        copy_bytes as f64 / (1 << 20) as f64,
    );

    // 4. The table.
    println!();
    println!(
        "{:<36} {:<18} {:>11} {:>11} {:>11} {:>8} {:>7} {:>7} {:>7}{}",
        "op",
        "shape",
        "median µs",
        "p20 µs",
        "p80 µs",
        "GB/s",
        "% copy",
        "copy",
        "fused×",
        if baseline.is_some() { "  vs base" } else { "" }
    );
    for r in &rows {
        let base = baseline.as_ref().map(|b| {
            b.rows
                .iter()
                .find(|x| x.op == r.op && x.shape == r.shape)
                .map_or("       -".to_string(), |x| {
                    format!("  {:>6.2}x", x.median_us / r.median_us)
                })
        });
        println!(
            "{:<36} {:<18} {:>11.1} {:>11.1} {:>11.1} {:>8.2} {:>6.1}% {:>7.2} {:>7}{}",
            r.op,
            fmt_shape(&r.shape),
            r.median_us,
            r.p20_us,
            r.p80_us,
            r.gb_per_s,
            r.pct_of_copy,
            r.copy_gb_per_s,
            r.fused_speedup.map_or("-".to_string(), |s| format!("{s:.2}x")),
            base.unwrap_or_default()
        );
    }
    for s in &skipped {
        println!("skipped  {s}");
    }
    if let Some(path) = &args.json {
        let report = Report {
            adapter: info.name.clone(),
            backend: format!("{:?}", info.backend),
            clock: runners::clock(ctx).to_string(),
            preset: p.name.to_string(),
            storage: ctx.storage(args.dtype).name().to_string(),
            copy_gb_per_s: copy_gbps,
            copy_runs_gb_per_s: copy_runs,
            copy_bytes,
            copy_quads_per_invocation: copy_grain.quads(),
            copy_grains,
            rows,
        };
        let text = serde_json::to_string_pretty(&report).map_err(|e| Error::InvalidArgument {
            op: "bench",
            reason: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        println!("wrote {}", path.display());
    }
    Ok(true)
}

fn progress(len: u64, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what);
    bar
}

#[cfg(test)]
mod tests {
    use super::parse_shape;

    #[test]
    fn shapes_are_positive_and_bounded() {
        assert_eq!(parse_shape("8x64x28x28").unwrap(), vec![8, 64, 28, 28]);
        assert_eq!(parse_shape("2147483648").unwrap(), vec![1 << 31]);
        for bad in [
            "1024x0",
            "0",
            "4294967296x4294967296x2x2",
            "2147483649",
            "3000000000",
            "x4",
            "-1",
        ] {
            assert!(parse_shape(bad).is_err(), "{bad}");
        }
        assert!(parse_shape("1024x0").unwrap_err().contains("at least 1"));
        assert!(parse_shape("4294967296x4294967296x2x2").unwrap_err().contains("2^31"));
    }
}
