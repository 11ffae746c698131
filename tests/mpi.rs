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
use normdrop::Context;

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

    // The calls that must fail on every rank instead of hanging.
    let result = sync_case::check_error_cases(&ctx, reducer.clone());
    check("error cases".into(), result);

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
    drop(reducer);
    drop(universe);
    std::process::exit(i32::from(all_failed > 0.0));
}
