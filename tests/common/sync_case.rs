//! One rank's part of a BatchNorm fixture split across a SyncBatchNorm group, shared by the
//! in-process test (a thread per rank) and the MPI test (a process per rank): the rank runs
//! its rows `start..end` of every step and of `dy`, and checks its slice of `y` and `dx`, the
//! running statistics (the fixture's, bit-identical on every rank) and the sum over ranks of
//! `dγ`, `dβ` against the fixture. Returns the failures, empty when the rank passed.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use normdrop::sync::StatsReducer;
use normdrop::{BatchNormConfig, Context, DType, Error, SyncBatchNorm, Tensor};
use normdrop_cli::fixture::{compare, Fixture};

/// The training fixtures of `tests/fixtures/torch` (SyncBatchNorm synchronises training calls;
/// eval is the plain BatchNorm's, local).
pub fn training_fixtures() -> Vec<Fixture> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch");
    let mut out: Vec<Fixture> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| Fixture::load(e.unwrap().path()).unwrap())
        .filter(|f| f.op == "batch_norm" && f.config["training"].as_bool() == Some(true))
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Uneven splits of `n` samples over `ranks` ranks, each with an empty rank or a rank of one.
pub fn splits(n: usize, ranks: usize) -> Vec<Vec<usize>> {
    match ranks {
        2 => vec![vec![n - n / 2, n / 2], vec![n, 0], vec![1, n - 1]],
        3 => vec![vec![0, 1, n - 1], vec![1, n - 2, 1], vec![n / 3, n - n / 3, 0]],
        r => vec![(0..r).map(|i| n / r + usize::from(i < n % r)).collect()],
    }
}

fn config_of(fx: &Fixture) -> BatchNormConfig {
    let c = &fx.config;
    BatchNormConfig {
        num_features: c["num_features"].as_u64().unwrap() as usize,
        eps: c["eps"].as_f64().unwrap() as f32,
        momentum: c["momentum"].as_f64().map(|m| m as f32),
        affine: c["affine"].as_bool().unwrap(),
        track_running_stats: c["track_running_stats"].as_bool().unwrap(),
    }
}

/// Rows `start..end` of axis 0 of a fixture tensor: values and shape.
fn rows(fx: &Fixture, name: &str, start: usize, end: usize) -> (Vec<f64>, Vec<usize>) {
    let t = fx.tensor(name).unwrap();
    let per: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = end - start;
    (t.data[start * per..end * per].to_vec(), shape)
}

/// This rank's part of `fx` with `split` (samples per rank); every rank of `reducer`'s group
/// calls it with the same fixture and split.
pub fn check_rank(ctx: &Context, reducer: Arc<dyn StatsReducer>, fx: &Fixture, split: &[usize]) -> Vec<String> {
    let rank = reducer.rank();
    let start: usize = split[..rank].iter().sum();
    let end = start + split[rank];
    let label = format!("{} split {split:?} rank {rank}", fx.name);
    let mut failures = Vec::new();
    let mut close = |what: &str, got: &[f64], exp: &[f64]| {
        let c = compare(got, exp, fx.rtol, fx.atol);
        if !c.passed {
            failures.push(format!(
                "{label} {what}: max_abs_err {:.3e}, {:.2}x the tolerance",
                c.max_abs_err, c.worst_ratio
            ));
        }
    };
    let config = config_of(fx);
    let dtype = if fx.dtype == "float16" { DType::F16 } else { DType::F32 };
    let mut bn = SyncBatchNorm::new(ctx, config.clone(), reducer.clone()).unwrap();
    let f32s = |name: &str| {
        fx.tensor(name)
            .unwrap()
            .data
            .iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>()
    };
    if config.affine {
        bn.set_weight(&f32s("weight")).unwrap();
        bn.set_bias(&f32s("bias")).unwrap();
    }
    if config.track_running_stats {
        bn.set_running_mean(&f32s("running_mean")).unwrap();
        bn.set_running_var(&f32s("running_var")).unwrap();
    }
    let tensor = |name: &str| {
        let (v, shape) = rows(fx, name, start, end);
        let v: Vec<f32> = v.iter().map(|&a| a as f32).collect();
        Tensor::from_f32(ctx, &v, &shape, dtype).unwrap()
    };
    let read = |t: &Tensor| {
        if t.numel() == 0 {
            Vec::new()
        } else {
            t.to_f64_blocking(ctx).unwrap()
        }
    };
    let steps = fx.config["steps"].as_u64().unwrap() as usize;
    for step in 0..steps {
        let y = bn.forward(&tensor(&format!("x.{step}"))).unwrap();
        close(
            &format!("y.{step}"),
            &read(&y),
            &rows(fx, &format!("y.{step}"), start, end).0,
        );
    }
    let g = bn.backward(&tensor("dy")).unwrap();
    close("dx", &read(&g.dx), &rows(fx, "dx", start, end).0);
    // dγ and dβ are this rank's own sums; over the group they add up to the fixture's.
    for (name, t) in [("dweight", &g.dweight), ("dbias", &g.dbias)] {
        if let Some(t) = t {
            let all = reducer.all_gather(&read(t)).unwrap();
            let c = config.num_features;
            let sum: Vec<f64> = (0..c).map(|i| all.iter().skip(i).step_by(c).sum()).collect();
            close(&format!("Σ ranks {name}"), &sum, &fx.tensor(name).unwrap().data);
        }
    }
    if config.track_running_stats {
        let rm = bn.running_mean().unwrap().to_vec_blocking::<f32>(ctx).unwrap();
        let rv = bn.running_var().unwrap().to_vec_blocking::<f32>(ctx).unwrap();
        let count = bn.num_batches_tracked_blocking().unwrap().unwrap();
        let wide = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
        close(
            "running_mean",
            &wide(&rm),
            &fx.tensor("running_mean.final").unwrap().data,
        );
        close("running_var", &wide(&rv), &fx.tensor("running_var.final").unwrap().data);
        if count as f64 != fx.tensor("num_batches_tracked.final").unwrap().data[0] {
            failures.push(format!("{label}: num_batches_tracked {count}"));
        }
        // Bit-identical on every rank: gather the bits and compare with rank 0's.
        let bits: Vec<f64> = rm.iter().chain(&rv).map(|v| f64::from(v.to_bits())).collect();
        let all = reducer.all_gather(&bits).unwrap();
        if all.chunks(bits.len()).any(|r| r != &all[..bits.len()]) {
            failures.push(format!("{label}: running statistics differ between ranks"));
        }
    }
    failures
}

/// This rank's part of the calls that must fail on every rank instead of hanging, then leave
/// the group usable: rank 1 with 3 channels where the others have 4; the last rank's bad shape
/// (its own `Shape` error there, `Distributed` elsewhere, running mean unchanged), then a call
/// every rank agrees on, which succeeds; `M = 1` over the whole group (one value on rank 0).
/// Returns the failures, empty when the rank passed.
pub fn check_error_cases(ctx: &Context, reducer: Arc<dyn StatsReducer>) -> Vec<String> {
    let (rank, ranks) = (reducer.rank(), reducer.ranks());
    let mut failures = Vec::new();
    let c = if rank == 1 { 3 } else { 4 };
    let mut odd = SyncBatchNorm::new(ctx, BatchNormConfig::new(c), reducer.clone()).unwrap();
    let x = Tensor::from_slice(ctx, &vec![1.0f32; 2 * c * 5], &[2, c, 5]).unwrap();
    match odd.forward(&x) {
        Err(Error::Distributed { .. }) => {}
        other => failures.push(format!(
            "rank {rank}, disagreeing C: expected Distributed, got {other:?}"
        )),
    }
    let mut bn = SyncBatchNorm::new(ctx, BatchNormConfig::new(4), reducer.clone()).unwrap();
    let last = rank == ranks - 1;
    let shape = if last { [2, 5, 5] } else { [2, 4, 5] };
    let bad = Tensor::from_slice(ctx, &vec![1.0f32; shape.iter().product()], &shape).unwrap();
    match (last, bn.forward(&bad)) {
        (true, Err(Error::Shape { .. })) | (false, Err(Error::Distributed { .. })) => {}
        (_, other) => failures.push(format!("rank {rank}, the last rank's bad input: got {other:?}")),
    }
    if bn.running_mean().unwrap().to_vec_blocking::<f32>(ctx).unwrap() != vec![0.0; 4] {
        failures.push(format!("rank {rank}: a failed call changed the running mean"));
    }
    let good: Vec<f32> = (0..40).map(|i| (i * 7 % 11) as f32 + rank as f32).collect();
    if let Err(e) = bn.forward(&Tensor::from_slice(ctx, &good, &[2, 4, 5]).unwrap()) {
        failures.push(format!("rank {rank}: the group is not usable after failed calls: {e}"));
    }
    let mut tiny = SyncBatchNorm::new(ctx, BatchNormConfig::new(2), reducer).unwrap();
    let n = usize::from(rank == 0);
    match tiny.forward(&Tensor::from_slice(ctx, &vec![1.0f32; 2 * n], &[n, 2]).unwrap()) {
        Err(Error::Shape { .. }) => {}
        other => failures.push(format!(
            "rank {rank}, M = 1 over the group: expected Shape, got {other:?}"
        )),
    }
    failures
}
