//! SyncBatchNorm over MPI, one process per rank: run under `mpirun -n R` (2 or 3) by
//! `scripts/test-distributed.sh` (`cargo test --features mpi --test mpi` builds it; it has its
//! own `main`, since MPI is initialized once per process). Every BatchNorm training fixture is
//! split unevenly across the ranks (an empty rank and a rank of one sample among the splits);
//! each rank checks its slice of `y` and `dx`, the running statistics (bit-identical on every
//! rank) and the sum over ranks of `dγ`, `dβ` against the fixture. Then the calls that must fail
//! on every rank instead of hanging: ranks disagreeing on C, one rank's bad input, M = 1 over
//! the group. Rank 0 prints `N passed, M failed` (checks over all ranks); any failure exits 1.

mod common;
#[path = "common/sync_case.rs"]
mod sync_case;

use std::sync::Arc;

use normdrop::sync::{MpiReducer, StatsReducer};
use normdrop::{BatchNormConfig, Context, Error, SyncBatchNorm, Tensor};

fn main() {
    let universe = mpi::initialize().expect("MPI initializes (run under mpirun)");
    // An MPI communicator stays on its thread: the Arc only shares it between this rank's modules.
    #[allow(clippy::arc_with_non_send_sync)]
    let reducer: Arc<dyn StatsReducer> = Arc::new(MpiReducer::new(universe.world()));
    let (rank, ranks) = (reducer.rank(), reducer.ranks());
    let ctx = Context::new_blocking().expect("a GPU adapter (lavapipe on CPU-only machines)");
    let mut passed = 0usize;
    let mut failures: Vec<String> = Vec::new();
    let mut check = |name: String, result: Vec<String>| {
        if result.is_empty() {
            passed += 1;
        } else {
            failures.extend(result.into_iter().map(|f| format!("{name}: {f}")));
        }
    };

    for fx in sync_case::training_fixtures() {
        let n = fx.tensor("x.0").unwrap().shape[0];
        for split in sync_case::splits(n, ranks) {
            let result = sync_case::check_rank(&ctx, reducer.clone(), &fx, &split);
            check(format!("{} {split:?}", fx.name), result);
        }
    }

    // Ranks disagreeing on C: an error on every rank.
    let c = if rank == 1 { 3 } else { 4 };
    let mut odd = SyncBatchNorm::new(&ctx, BatchNormConfig::new(c), reducer.clone()).unwrap();
    let x = Tensor::from_slice(&ctx, &vec![1.0f32; 2 * c * 5], &[2, c, 5]).unwrap();
    let r = odd.forward(&x);
    check(
        "disagreeing C".into(),
        match r {
            Err(Error::Distributed { .. }) => vec![],
            other => vec![format!("expected Distributed, got {other:?}")],
        },
    );
    // The last rank's bad shape: its own error there, Distributed elsewhere; nothing changes.
    let mut bn = SyncBatchNorm::new(&ctx, BatchNormConfig::new(4), reducer.clone()).unwrap();
    let shape = if rank == ranks - 1 { [2, 5, 5] } else { [2, 4, 5] };
    let bad = Tensor::from_slice(&ctx, &vec![1.0f32; shape.iter().product()], &shape).unwrap();
    let r = bn.forward(&bad);
    let unchanged = bn.running_mean().unwrap().to_vec_blocking::<f32>(&ctx).unwrap() == vec![0.0; 4];
    check(
        "one rank's bad input".into(),
        match (rank == ranks - 1, r, unchanged) {
            (true, Err(Error::Shape { .. }), true) | (false, Err(Error::Distributed { .. }), true) => vec![],
            (_, other, unchanged) => vec![format!("got {other:?}, running mean unchanged: {unchanged}")],
        },
    );
    // M = 1 over the whole group: one value on rank 0, none elsewhere.
    let mut tiny = SyncBatchNorm::new(&ctx, BatchNormConfig::new(2), reducer.clone()).unwrap();
    let n = usize::from(rank == 0);
    let r = tiny.forward(&Tensor::from_slice(&ctx, &vec![1.0f32; 2 * n], &[n, 2]).unwrap());
    check(
        "M = 1 over the group".into(),
        match r {
            Err(Error::Shape { .. }) => vec![],
            other => vec![format!("expected Shape, got {other:?}")],
        },
    );

    for f in &failures {
        eprintln!("rank {rank}: FAILED {f}");
    }
    let totals = reducer
        .all_gather(&[passed as f64, failures.len() as f64])
        .expect("gather the counts");
    let (all_passed, all_failed) = totals.chunks(2).fold((0.0, 0.0), |(p, f), r| (p + r[0], f + r[1]));
    if rank == 0 {
        println!("SyncBatchNorm over MPI, {ranks} ranks: {all_passed} passed, {all_failed} failed");
    }
    drop(bn);
    drop(odd);
    drop(tiny);
    drop(reducer);
    drop(universe);
    std::process::exit(i32::from(all_failed > 0.0));
}
