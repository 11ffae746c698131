//! SyncBatchNorm across in-process ranks (one Context and one thread per rank, as several GPUs
//! in one machine): every BatchNorm fixture's batch split across 2 and 3 ranks, unevenly and
//! with an empty rank, must give each rank its slice of the fixture's `y` and `dx`, the
//! fixture's running statistics and counter on every rank (bit-identical across ranks), and
//! `dγ`, `dβ` whose sum over ranks is the fixture's. Plus the disagreements that must fail on
//! every rank instead of hanging.

mod common;

use std::path::Path;
use std::sync::Arc;

use normdrop::sync::{InProcessReducer, StatsReducer};
use normdrop::{BatchNormConfig, Context, DType, Error, SyncBatchNorm, Tensor};
use normdrop_cli::fixture::{compare, Fixture};

/// The training fixtures (SyncBatchNorm synchronises training calls; eval is local and is the
/// plain BatchNorm's).
fn training_fixtures() -> Vec<Fixture> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch");
    let mut out: Vec<Fixture> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| Fixture::load(e.unwrap().path()).unwrap())
        .filter(|f| f.op == "batch_norm" && f.config["training"].as_bool() == Some(true))
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
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

/// Rows `start..end` of axis 0 of a fixture tensor, as f32.
fn rows(fx: &Fixture, name: &str, start: usize, end: usize) -> (Vec<f32>, Vec<usize>) {
    let t = fx.tensor(name).unwrap();
    let per: usize = t.shape[1..].iter().product();
    let data = t.data[start * per..end * per].iter().map(|&v| v as f32).collect();
    let mut shape = t.shape.clone();
    shape[0] = end - start;
    (data, shape)
}

/// What one rank computed.
struct RankOut {
    ys: Vec<Vec<f64>>,
    dx: Vec<f64>,
    dweight: Option<Vec<f64>>,
    dbias: Option<Vec<f64>>,
    running: Option<(Vec<f32>, Vec<f32>, u64)>,
}

/// Runs `fx` over ranks holding `split[r]` samples each (summing to the fixture's N).
fn run_split(fx: &Fixture, split: &[usize]) -> Vec<RankOut> {
    let group = InProcessReducer::group(split.len());
    let mut bounds = vec![0];
    for n in split {
        bounds.push(bounds.last().unwrap() + n);
    }
    let fx = Arc::new(fx.clone());
    let handles: Vec<_> = group
        .into_iter()
        .enumerate()
        .map(|(r, reducer)| {
            let fx = fx.clone();
            let (start, end) = (bounds[r], bounds[r + 1]);
            std::thread::spawn(move || {
                let ctx = Context::new_blocking().unwrap();
                let config = config_of(&fx);
                let dtype = if fx.dtype == "float16" { DType::F16 } else { DType::F32 };
                let mut bn = SyncBatchNorm::new(&ctx, config.clone(), Arc::new(reducer)).unwrap();
                let weights = |name: &str| {
                    fx.tensor(name)
                        .unwrap()
                        .data
                        .iter()
                        .map(|&v| v as f32)
                        .collect::<Vec<_>>()
                };
                if config.affine {
                    bn.set_weight(&weights("weight")).unwrap();
                    bn.set_bias(&weights("bias")).unwrap();
                }
                if config.track_running_stats {
                    bn.set_running_mean(&weights("running_mean")).unwrap();
                    bn.set_running_var(&weights("running_var")).unwrap();
                }
                let steps = fx.config["steps"].as_u64().unwrap() as usize;
                let mut ys = Vec::new();
                for step in 0..steps {
                    let (x, shape) = rows(&fx, &format!("x.{step}"), start, end);
                    let x = Tensor::from_f32(&ctx, &x, &shape, dtype).unwrap();
                    let y = bn.forward(&x).unwrap();
                    ys.push(if end > start {
                        y.to_f64_blocking(&ctx).unwrap()
                    } else {
                        Vec::new()
                    });
                }
                let (dy, shape) = rows(&fx, "dy", start, end);
                let g = bn
                    .backward(&Tensor::from_f32(&ctx, &dy, &shape, dtype).unwrap())
                    .unwrap();
                let read = |t: Option<&Tensor>| t.map(|t| t.to_f64_blocking(&ctx).unwrap());
                let running = config.track_running_stats.then(|| {
                    (
                        bn.running_mean().unwrap().to_vec_blocking::<f32>(&ctx).unwrap(),
                        bn.running_var().unwrap().to_vec_blocking::<f32>(&ctx).unwrap(),
                        bn.num_batches_tracked_blocking().unwrap().unwrap(),
                    )
                });
                RankOut {
                    ys,
                    dx: if end > start {
                        g.dx.to_f64_blocking(&ctx).unwrap()
                    } else {
                        Vec::new()
                    },
                    dweight: read(g.dweight.as_ref()),
                    dbias: read(g.dbias.as_ref()),
                    running,
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn assert_close(fx: &Fixture, what: &str, got: &[f64], exp: &[f64]) {
    let c = compare(got, exp, fx.rtol, fx.atol);
    assert!(
        c.passed,
        "{} {what}: max_abs_err {:.3e}, {:.2}x the tolerance",
        fx.name, c.max_abs_err, c.worst_ratio
    );
}

#[test]
fn every_training_fixture_split_across_ranks_matches() {
    if common::ctx().is_none() {
        return;
    }
    let fixtures = training_fixtures();
    assert!(fixtures.len() >= 6, "{} training fixtures", fixtures.len());
    for fx in &fixtures {
        let n = fx.tensor("x.0").unwrap().shape[0];
        let mut splits = vec![vec![n - n / 2, n / 2], vec![n, 0], vec![0, 1, n - 1]];
        if n >= 3 {
            splits.push(vec![1, n - 2, 1]);
        }
        for split in splits {
            let outs = run_split(fx, &split);
            let label = format!("split {split:?}");
            let steps = fx.config["steps"].as_u64().unwrap() as usize;
            for step in 0..steps {
                let y: Vec<f64> = outs.iter().flat_map(|o| o.ys[step].clone()).collect();
                assert_close(
                    fx,
                    &format!("{label} y.{step}"),
                    &y,
                    &fx.tensor(&format!("y.{step}")).unwrap().data,
                );
            }
            let dx: Vec<f64> = outs.iter().flat_map(|o| o.dx.clone()).collect();
            assert_close(fx, &format!("{label} dx"), &dx, &fx.tensor("dx").unwrap().data);
            for (name, pick) in [
                (
                    "dweight",
                    (|o: &RankOut| o.dweight.clone()) as fn(&RankOut) -> Option<Vec<f64>>,
                ),
                ("dbias", |o: &RankOut| o.dbias.clone()),
            ] {
                if let Ok(exp) = fx.tensor(name) {
                    let mut sum = vec![0.0; exp.data.len()];
                    for o in &outs {
                        for (s, v) in sum.iter_mut().zip(pick(o).unwrap()) {
                            *s += v;
                        }
                    }
                    assert_close(fx, &format!("{label} Σ ranks {name}"), &sum, &exp.data);
                }
            }
            if let Some((rm, rv, count)) = &outs[0].running {
                let wide = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
                assert_close(
                    fx,
                    &format!("{label} running_mean"),
                    &wide(rm),
                    &fx.tensor("running_mean.final").unwrap().data,
                );
                assert_close(
                    fx,
                    &format!("{label} running_var"),
                    &wide(rv),
                    &fx.tensor("running_var.final").unwrap().data,
                );
                assert_eq!(*count as f64, fx.tensor("num_batches_tracked.final").unwrap().data[0]);
                for (r, o) in outs.iter().enumerate() {
                    let (orm, orv, ocount) = o.running.as_ref().unwrap();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(orm), bits(rm), "{} {label}: rank {r}'s running_mean", fx.name);
                    assert_eq!(bits(orv), bits(rv), "{} {label}: rank {r}'s running_var", fx.name);
                    assert_eq!(ocount, count);
                }
            }
        }
    }
}

#[test]
fn ranks_that_disagree_or_fail_all_return_errors() {
    if common::ctx().is_none() {
        return;
    }
    // Rank 1 has 3 channels where the others have 4; then rank 2 passes a bad shape; then all
    // agree and the call succeeds (the failed calls left the group usable).
    let group = InProcessReducer::group(3);
    let handles: Vec<_> = group
        .into_iter()
        .map(|reducer| {
            std::thread::spawn(move || {
                let ctx = Context::new_blocking().unwrap();
                let r = reducer.rank();
                let reducer: Arc<dyn StatsReducer> = Arc::new(reducer);
                let c = if r == 1 { 3 } else { 4 };
                let mut odd = SyncBatchNorm::new(&ctx, BatchNormConfig::new(c), reducer.clone()).unwrap();
                let x = Tensor::from_slice(&ctx, &vec![1.0f32; 2 * c * 5], &[2, c, 5]).unwrap();
                let disagreed = odd.forward(&x);
                let mut bn = SyncBatchNorm::new(&ctx, BatchNormConfig::new(4), reducer.clone()).unwrap();
                let shape = if r == 2 { [2, 5, 5] } else { [2, 4, 5] };
                let bad = Tensor::from_slice(&ctx, &vec![1.0f32; shape.iter().product()], &shape).unwrap();
                let failed = bn.forward(&bad);
                let before = bn.running_mean().unwrap().to_vec_blocking::<f32>(&ctx).unwrap();
                let good: Vec<f32> = (0..40).map(|i| (i * 7 % 11) as f32 + r as f32).collect();
                let ok = bn.forward(&Tensor::from_slice(&ctx, &good, &[2, 4, 5]).unwrap());
                // M = 1 over the whole group: one sample of one position on rank 0 only.
                let mut tiny = SyncBatchNorm::new(&ctx, BatchNormConfig::new(2), reducer).unwrap();
                let n = usize::from(r == 0);
                let one = Tensor::from_slice(&ctx, &vec![1.0f32; 2 * n], &[n, 2]).unwrap();
                let single = tiny.forward(&one);
                (r, disagreed.err(), failed.err(), before, ok.is_ok(), single.err())
            })
        })
        .collect();
    for h in handles {
        let (r, disagreed, failed, before, ok, single) = h.join().unwrap();
        assert!(
            matches!(disagreed, Some(Error::Distributed { .. })),
            "rank {r}: {disagreed:?}"
        );
        match (r, failed) {
            (2, Some(Error::Shape { .. })) => {}
            (2, other) => panic!("rank 2 should report its own shape error, got {other:?}"),
            (_, Some(Error::Distributed { .. })) => {}
            (_, other) => panic!("rank {r} should report rank 2's failure, got {other:?}"),
        }
        assert_eq!(before, vec![0.0; 4], "rank {r}: a failed call changed the running mean");
        assert!(ok, "rank {r}: the group is usable after failed calls");
        assert!(
            matches!(single, Some(Error::Shape { .. })),
            "rank {r}: M = 1 over the group: {single:?}"
        );
    }
}
