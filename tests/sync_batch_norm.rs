//! SyncBatchNorm across in-process ranks (one Context and one thread per rank, as several GPUs
//! in one machine): every BatchNorm fixture's batch split across 2 and 3 ranks, unevenly and
//! with an empty rank, must give each rank its slice of the fixture's `y` and `dx`, the
//! fixture's running statistics and counter on every rank (bit-identical across ranks), and
//! `dγ`, `dβ` whose sum over ranks is the fixture's. Plus the disagreements that must fail on
//! every rank instead of hanging.

mod common;
#[path = "common/sync_case.rs"]
mod sync_case;

use std::sync::Arc;

use normdrop::sync::{InProcessReducer, StatsReducer};
use normdrop::{BatchNormConfig, Context, Error, SyncBatchNorm, Tensor};
use sync_case::{check_error_cases, check_rank, splits, training_fixtures};

#[test]
fn every_training_fixture_split_across_ranks_matches() {
    if common::ctx().is_none() {
        return;
    }
    let fixtures = Arc::new(training_fixtures());
    assert!(fixtures.len() >= 6, "{} training fixtures", fixtures.len());
    let mut failures = Vec::new();
    let mut checked = 0;
    for ranks in [2, 3] {
        // One context per rank for the whole run (as one GPU per rank), every fixture and split.
        let handles: Vec<_> = InProcessReducer::group(ranks)
            .into_iter()
            .map(|reducer| {
                let fixtures = fixtures.clone();
                std::thread::spawn(move || {
                    let ctx = Context::new_blocking().unwrap();
                    let reducer: Arc<dyn StatsReducer> = Arc::new(reducer);
                    let mut failures = Vec::new();
                    let mut checked = 0;
                    for fx in fixtures.iter() {
                        let n = fx.tensor("x.0").unwrap().shape[0];
                        for split in splits(n, ranks) {
                            failures.extend(check_rank(&ctx, reducer.clone(), fx, &split));
                            checked += 1;
                        }
                    }
                    (failures, checked)
                })
            })
            .collect();
        for h in handles {
            let (f, c) = h.join().unwrap();
            failures.extend(f);
            checked += c;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 6 * 3 * 5, "{checked} rank checks");
}

#[test]
fn ranks_that_disagree_or_fail_all_return_errors() {
    if common::ctx().is_none() {
        return;
    }
    let handles: Vec<_> = InProcessReducer::group(3)
        .into_iter()
        .map(|reducer| {
            std::thread::spawn(move || {
                let ctx = Context::new_blocking().unwrap();
                check_error_cases(&ctx, Arc::new(reducer))
            })
        })
        .collect();
    let failures: Vec<String> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The split plan's own arguments: the export and import buffers are checked (usage, size,
/// alignment) before anything is recorded, and a plan with a fused dropout refuses the split.
#[test]
fn split_plans_check_their_exchange_buffers() {
    use normdrop::kernels::BatchNormBuffers;
    use normdrop::tuning::BatchNormPlanOptions;
    let Some(ctx) = common::ctx() else { return };
    let (c, shape) = (3, [4, 3, 5]);
    let kernel = ctx.kernel::<normdrop::BatchNormKernel>().unwrap();
    let plan = kernel.plan(ctx.device(), &shape, &BatchNormConfig::new(c)).unwrap();
    let t = |shape: &[usize]| Tensor::zeros(&ctx, shape, normdrop::DType::F32).unwrap();
    let (x, y, w, b, rm, rv, sm, si) = (
        t(&shape),
        t(&shape),
        t(&[c]),
        t(&[c]),
        t(&[c]),
        t(&[c]),
        t(&[c]),
        t(&[c]),
    );
    let nbt = t(&[2]);
    let buffers = BatchNormBuffers {
        x: x.slice(),
        y: y.slice(),
        weight: Some(w.slice()),
        bias: Some(b.slice()),
        running_mean: Some(rm.slice()),
        running_var: Some(rv.slice()),
        num_batches_tracked: Some(nbt.slice()),
        save_mean: sm.slice(),
        save_invstd: si.slice(),
        rng: None,
    };
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let no_copy = ctx.device().create_buffer(&normdrop::wgpu::BufferDescriptor {
        label: None,
        size: 64,
        usage: normdrop::wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let e = plan
        .encode_sync_stats(ctx.device(), &mut encoder, &buffers, &no_copy.slice(..))
        .unwrap_err();
    assert!(matches!(e, Error::Buffer { what: "export", .. }), "{e}");
    let small = t(&[2, 4]);
    let e = plan
        .encode_sync_stats(ctx.device(), &mut encoder, &buffers, &small.slice())
        .unwrap_err();
    assert!(matches!(e, Error::BufferTooSmall { what: "export", .. }), "{e}");
    let merged = t(&[c, 4]); // needs 2·C vec4
    let e = plan
        .encode_sync_finalize(ctx.device(), &mut encoder, &buffers, &merged.slice())
        .unwrap_err();
    assert!(matches!(e, Error::BufferTooSmall { what: "merged", .. }), "{e}");
    let aliased = BatchNormBuffers {
        y: x.slice(),
        ..buffers.clone()
    };
    let e = plan
        .encode_sync_stats(ctx.device(), &mut encoder, &aliased, &t(&[c, 4]).slice())
        .unwrap_err();
    assert!(matches!(e, Error::Aliased { .. }), "{e}");
    let dropping = kernel
        .plan_with(
            ctx.device(),
            &shape,
            &BatchNormConfig::new(c),
            &BatchNormPlanOptions {
                dropout: Some(normdrop::DropoutConfig::new(0.1)),
                ..Default::default()
            },
        )
        .unwrap();
    let e = dropping
        .encode_sync_stats(ctx.device(), &mut encoder, &buffers, &t(&[c, 4]).slice())
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    // Nothing was recorded: the running mean is untouched after the encoder is submitted.
    ctx.submit(encoder).unwrap();
    assert_eq!(rm.to_vec_blocking::<f32>(&ctx).unwrap(), vec![0.0; c]);
}

/// A rank that fails after the ranks agreed on a call (here its input's buffer was destroyed,
/// which only binding it reveals) still takes part in the collectives, so that every other rank
/// fails at once instead of waiting for it: in forward and in backward.
#[test]
fn a_rank_failing_after_the_agreement_fails_every_rank() {
    if common::ctx().is_none() {
        return;
    }
    let group = InProcessReducer::group_with_timeout(3, std::time::Duration::from_secs(30));
    let handles: Vec<_> = group
        .into_iter()
        .map(|reducer| {
            std::thread::spawn(move || {
                let ctx = Context::new_blocking().unwrap();
                let r = reducer.rank();
                let reducer: Arc<dyn StatsReducer> = Arc::new(reducer);
                let x: Vec<f32> = (0..40).map(|i| (i * 7 % 11) as f32 + r as f32).collect();
                let x = Tensor::from_slice(&ctx, &x, &[2, 4, 5]).unwrap();
                let start = std::time::Instant::now();
                let mut bn = SyncBatchNorm::new(&ctx, BatchNormConfig::new(4), reducer).unwrap();
                let broken = Tensor::from_slice(&ctx, &[1.0f32; 40], &[2, 4, 5]).unwrap();
                broken.buffer().destroy();
                let forward = bn.forward(if r == 1 { &broken } else { &x }).err();
                bn.forward(&x).unwrap();
                let backward = bn.backward(if r == 2 { &broken } else { &x }).err();
                (r, forward, backward, start.elapsed())
            })
        })
        .collect();
    for h in handles {
        let (r, forward, backward, elapsed) = h.join().unwrap();
        for (what, failing, e) in [("forward", 1, forward), ("backward", 2, backward)] {
            match (r == failing, &e) {
                (true, Some(Error::Buffer { .. })) => {}
                (false, Some(Error::Distributed { reason, .. })) if !reason.contains("waited") => {}
                _ => panic!("rank {r} {what}: {e:?}"),
            }
        }
        assert!(elapsed.as_secs() < 20, "rank {r} waited {elapsed:?}");
    }
}
