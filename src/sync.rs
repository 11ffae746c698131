//! The reducer boundary of SyncBatchNorm: how BatchNorm statistics of several GPUs or processes
//! meet. Free of any transport: a [`StatsReducer`] exchanges small host arrays (per channel: a
//! count, a mean and M2 in forward; two sums in backward); the GPU passes stay on each device
//! ([`crate::BatchNormPlan::encode_sync_stats`] and friends). [`InProcessReducer`] connects
//! several [`crate::Context`]s of one program (one thread per rank); an MPI or NCCL engine
//! implements [`StatsReducer::all_gather`] on its communicator.
//!
//! Every rank merges the gathered values in rank order, in f64, with the same code: the merged
//! statistics are bit-identical on every rank whatever the engine (an all-gather followed by a
//! fixed-order merge, rather than an engine's all-reduce whose summation order may differ
//! between ranks).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};

const OP: &str = "SyncBatchNorm";

/// One channel's statistics over some elements: count, mean and the sum of squared deviations
/// from the mean (M2). Merged with Chan's formula, never as E[x²] − E[x]².
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ChannelStats {
    /// Elements.
    pub count: f64,
    /// Their mean (0 when `count` is 0).
    pub mean: f64,
    /// Σ (x − mean)².
    pub m2: f64,
}

impl ChannelStats {
    /// Chan's merge of two disjoint sets' statistics.
    pub fn merge(self, other: Self) -> Self {
        let count = self.count + other.count;
        if count == 0.0 {
            return Self::default();
        }
        let d = other.mean - self.mean;
        Self {
            count,
            mean: self.mean + d * other.count / count,
            m2: self.m2 + other.m2 + d * d * self.count * other.count / count,
        }
    }
}

/// A collective over the ranks of one SyncBatchNorm group. Implement [`all_gather`]
/// (`MPI_Allgather`, `ncclAllGather`, a shared buffer between threads); the merges are provided
/// and run identically on every rank.
///
/// Every rank must make the same calls in the same order: each SyncBatchNorm training forward
/// calls [`agree`](Self::agree), then [`all_reduce_stats`](Self::all_reduce_stats) (a rank that
/// failed in between sends NaN counts, and every rank fails); each backward with batch
/// statistics [`agree`](Self::agree) twice (before and after its GPU pass), then
/// [`all_reduce_sums`](Self::all_reduce_sums). A rank whose call fails locally (a bad input)
/// still takes part in `agree`, with a status that makes every rank return an error instead of
/// waiting for it.
///
/// [`all_gather`]: Self::all_gather
pub trait StatsReducer {
    /// Ranks in the group.
    fn ranks(&self) -> usize;

    /// This rank's index, `0..ranks()`.
    fn rank(&self) -> usize;

    /// Every rank's `local` (the same length on every rank), concatenated in rank order, on
    /// every rank.
    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>>;

    /// Checks that every rank is ready to run the same call: `status` is `Ok(key)` with a hash
    /// of what must agree (channels, configuration, the call), or this rank's local error.
    /// Returns that error on the rank that failed and [`Error::Distributed`] on the others
    /// when any rank failed or the keys differ.
    fn agree(&self, status: Result<u64>) -> Result<()> {
        let (ok, key) = match &status {
            Ok(key) => (1.0, *key),
            Err(_) => (0.0, 0),
        };
        // A u64 does not fit an f64: its two halves do.
        let all = self.all_gather(&[ok, (key >> 32) as f64, (key & 0xffff_ffff) as f64])?;
        status?;
        let ranks: Vec<&[f64]> = all.chunks(3).collect();
        if let Some(failed) = ranks.iter().position(|r| r[0] != 1.0) {
            return Err(Error::Distributed {
                op: OP,
                reason: format!("rank {failed} of {} failed this call", ranks.len()),
            });
        }
        if let Some(other) = ranks.iter().position(|r| r[1..] != ranks[self.rank()][1..]) {
            return Err(Error::Distributed {
                op: OP,
                reason: format!(
                    "rank {other} disagrees with rank {} on the number of channels, the \
                     configuration or the call (every rank must run the same module in the same mode)",
                    self.rank()
                ),
            });
        }
        Ok(())
    }

    /// Merges every rank's per-channel statistics (Chan's formula in f64, in rank order).
    fn all_reduce_stats(&self, local: &[ChannelStats]) -> Result<Vec<ChannelStats>> {
        let flat: Vec<f64> = local.iter().flat_map(|s| [s.count, s.mean, s.m2]).collect();
        let all = self.all_gather(&flat)?;
        let mut merged = vec![ChannelStats::default(); local.len()];
        for rank in all.chunks(flat.len().max(1)) {
            for (m, s) in merged.iter_mut().zip(rank.chunks(3)) {
                *m = m.merge(ChannelStats {
                    count: s[0],
                    mean: s[1],
                    m2: s[2],
                });
            }
        }
        Ok(merged)
    }

    /// Adds every rank's per-channel `(Σdy, Σdy·x̂)` (in f64, in rank order).
    fn all_reduce_sums(&self, local: &[[f64; 2]]) -> Result<Vec<[f64; 2]>> {
        let flat: Vec<f64> = local.iter().flatten().copied().collect();
        let all = self.all_gather(&flat)?;
        let mut sums = vec![[0.0; 2]; local.len()];
        for rank in all.chunks(flat.len().max(1)) {
            for (s, r) in sums.iter_mut().zip(rank.chunks(2)) {
                s[0] += r[0];
                s[1] += r[1];
            }
        }
        Ok(sums)
    }
}

/// The shared state of one in-process group.
#[derive(Debug)]
struct Group {
    ranks: usize,
    timeout: Duration,
    state: Mutex<Round>,
    turn: Condvar,
}

/// One all-gather round: the slots filled so far, and how many ranks have taken the result.
#[derive(Debug, Default)]
struct Round {
    generation: u64,
    slots: Vec<Option<Vec<f64>>>,
    taken: usize,
    result: Option<Vec<f64>>,
}

/// A [`StatsReducer`] between threads of one program, for several GPUs in one machine: one
/// per rank, from [`InProcessReducer::group`]. Each rank's calls block until every rank has
/// made the same call, or fail with [`Error::Distributed`] after the group's timeout (a rank
/// that stopped calling, for example a thread that panicked).
#[derive(Clone, Debug)]
pub struct InProcessReducer {
    group: Arc<Group>,
    rank: usize,
}

impl InProcessReducer {
    /// `ranks` connected reducers, rank 0 first, waiting at most 60 s for each other.
    pub fn group(ranks: usize) -> Vec<Self> {
        Self::group_with_timeout(ranks, Duration::from_secs(60))
    }

    /// [`Self::group`] with a timeout for each collective.
    pub fn group_with_timeout(ranks: usize, timeout: Duration) -> Vec<Self> {
        let group = Arc::new(Group {
            ranks,
            timeout,
            state: Mutex::new(Round {
                slots: vec![None; ranks],
                ..Round::default()
            }),
            turn: Condvar::new(),
        });
        (0..ranks)
            .map(|rank| Self {
                group: group.clone(),
                rank,
            })
            .collect()
    }
}

impl StatsReducer for InProcessReducer {
    fn ranks(&self) -> usize {
        self.group.ranks
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>> {
        let g = &self.group;
        let lost = || Error::Distributed {
            op: OP,
            reason: format!(
                "rank {} waited {:?} for the other ranks of the in-process group",
                self.rank, g.timeout
            ),
        };
        let mut st = g.state.lock().map_err(poisoned)?;
        // Wait until the previous round's result has been taken by everyone.
        while st.result.is_some() {
            let (next, timeout) = g.turn.wait_timeout(st, g.timeout).map_err(poisoned)?;
            st = next;
            if timeout.timed_out() && st.result.is_some() {
                return Err(lost());
            }
        }
        st.slots[self.rank] = Some(local.to_vec());
        if st.slots.iter().all(Option::is_some) {
            let all: Vec<f64> = st.slots.iter_mut().flat_map(|s| s.take().unwrap_or_default()).collect();
            st.result = Some(all);
            g.turn.notify_all();
        }
        let generation = st.generation;
        while st.result.is_none() || st.generation != generation {
            let (next, timeout) = g.turn.wait_timeout(st, g.timeout).map_err(poisoned)?;
            st = next;
            if timeout.timed_out() && st.result.is_none() {
                // Withdraw, so that a later round does not see this rank's stale values.
                st.slots[self.rank] = None;
                return Err(lost());
            }
        }
        let out = st.result.clone().unwrap_or_default();
        st.taken += 1;
        if st.taken == g.ranks {
            st.result = None;
            st.taken = 0;
            st.generation += 1;
            g.turn.notify_all();
        }
        Ok(out)
    }
}

/// The error of a lock a panicking rank poisoned.
fn poisoned<T>(_: T) -> Error {
    Error::Distributed {
        op: OP,
        reason: "a rank of the in-process group panicked".into(),
    }
}

/// A [`StatsReducer`] over an MPI communicator the caller passes in (`--features mpi`, the
/// [`mpi`] crate): `MPI_Allgather` of each rank's values, then the provided merges in rank
/// order, so every rank holds bit-identical statistics. An all-gather rather than an
/// `MPI_Allreduce` with a custom Chan operation: the operation's order of application is the
/// MPI library's choice and may differ between ranks, and the payload (C × 3 values per rank)
/// is small. MPI errors abort the job (MPI's default error handler).
#[cfg(feature = "mpi")]
pub struct MpiReducer<C: mpi::traits::Communicator> {
    comm: C,
}

#[cfg(feature = "mpi")]
impl<C: mpi::traits::Communicator> MpiReducer<C> {
    /// A reducer over `comm` (for example `universe.world()`); every rank of it must create one.
    pub fn new(comm: C) -> Self {
        Self { comm }
    }

    /// The communicator.
    pub fn communicator(&self) -> &C {
        &self.comm
    }
}

#[cfg(feature = "mpi")]
impl<C: mpi::traits::Communicator> StatsReducer for MpiReducer<C> {
    fn ranks(&self) -> usize {
        self.comm.size() as usize
    }

    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>> {
        use mpi::traits::CommunicatorCollectives;
        let mut out = vec![0.0f64; local.len() * self.ranks()];
        self.comm.all_gather_into(local, &mut out[..]);
        Ok(out)
    }
}

/// A hash of `parts` (FNV-1a over their little-endian bytes), for [`StatsReducer::agree`].
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn key(parts: &[u64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chan_merge_equals_the_two_pass_statistics() {
        let xs = [1.0, 2.5, -3.0, 4.0, 10.0, 0.5];
        let stats = |v: &[f64]| {
            let n = v.len() as f64;
            let mean = v.iter().sum::<f64>() / n;
            ChannelStats {
                count: n,
                mean,
                m2: v.iter().map(|x| (x - mean) * (x - mean)).sum(),
            }
        };
        let merged = stats(&xs[..2]).merge(ChannelStats::default()).merge(stats(&xs[2..]));
        let whole = stats(&xs);
        assert!((merged.mean - whole.mean).abs() < 1e-12);
        assert!((merged.m2 - whole.m2).abs() < 1e-12);
        assert_eq!(merged.count, 6.0);
    }

    #[test]
    fn in_process_ranks_gather_in_rank_order_and_detect_disagreement() {
        let group = InProcessReducer::group(3);
        let handles: Vec<_> = group
            .into_iter()
            .map(|r| {
                std::thread::spawn(move || {
                    let mut outs = Vec::new();
                    for round in 0..20 {
                        outs.push(r.all_gather(&[r.rank() as f64, round as f64]).unwrap());
                    }
                    let agreed = r.agree(Ok(7)).is_ok();
                    let disagreed = r.agree(Ok(if r.rank() == 2 { 8 } else { 7 })).is_err();
                    let failed = r.agree(if r.rank() == 1 {
                        Err(Error::invalid("x", "local"))
                    } else {
                        Ok(7)
                    });
                    (outs, agreed, disagreed, failed.is_err())
                })
            })
            .collect();
        for h in handles {
            let (outs, agreed, disagreed, failed) = h.join().unwrap();
            for (round, out) in outs.iter().enumerate() {
                let r = round as f64;
                assert_eq!(out, &vec![0.0, r, 1.0, r, 2.0, r]);
            }
            assert!(agreed && disagreed && failed);
        }
    }

    #[test]
    fn a_missing_rank_times_out_instead_of_hanging() {
        let mut group = InProcessReducer::group_with_timeout(2, Duration::from_millis(200));
        let alone = group.remove(0);
        assert!(matches!(alone.all_gather(&[1.0]), Err(Error::Distributed { .. })));
    }
}
