// include-only: validated as part of the shaders that include it.
// lib/workgroup_reduce.wgsl with subgroup operations, for devices with SUBGROUP: the same functions
// with the same results up to rounding. A subgroup reduces in registers (a butterfly of
// shuffles for the Chan merge, subgroupAdd for sums); the first invocation of every subgroup
// writes the subgroup's result to workgroup memory, and after one barrier every invocation folds
// the WG / size subgroup results in order. Two barriers instead of four, and 256 / size entries
// of workgroup memory instead of 256.
//
// Subgroup size is read at run time (8 on lavapipe, 32 on NVIDIA, 64 on AMD; any power of two
// from 4 to 128). Subgroups are taken to be consecutive blocks of `size` invocations of
// local_invocation_index, as every driver lays out a one-dimensional workgroup whose size (256)
// is a multiple of the subgroup size; the order of the fold, and so the rounding, is then fixed.
//
// The including shader declares `const WG: u32 = 256u`. Every invocation of the workgroup must
// call, in uniform control flow.

// #include "lib/welford.wgsl"

// 256 / the smallest subgroup size (4).
const MAX_SUBGROUPS: u32 = 64u;

var<workgroup> subgroup_stats: array<Stat, MAX_SUBGROUPS>;
var<workgroup> subgroup_sums: array<vec3<f32>, MAX_SUBGROUPS>;

// Invocations in this subgroup (every invocation is active where the functions below are called).
fn subgroup_len() -> u32 {
    return subgroupAdd(1u);
}

// Merges every invocation's triple; every invocation gets the workgroup's total.
fn workgroup_merge(lid: u32, mine: Stat) -> Stat {
    let size = subgroup_len();
    var acc = mine;
    for (var d = 1u; d < size; d <<= 1u) {
        let other = Stat(subgroupShuffleXor(acc.n, d), subgroupShuffleXor(acc.mean, d), subgroupShuffleXor(acc.m2, d));
        acc = chan_merge(acc, other);
    }
    if (lid % size == 0u) {
        subgroup_stats[lid / size] = acc;
    }
    workgroupBarrier();
    var total = subgroup_stats[0];
    for (var g = 1u; g < WG / size; g++) {
        total = chan_merge(total, subgroup_stats[g]);
    }
    // Keep a later call from overwriting subgroup_stats before everyone has read it.
    workgroupBarrier();
    return total;
}

// Sums every invocation's vector; every invocation gets the workgroup's total.
fn workgroup_sum3(lid: u32, mine: vec3<f32>) -> vec3<f32> {
    let size = subgroup_len();
    let sum = subgroupAdd(mine);
    if (lid % size == 0u) {
        subgroup_sums[lid / size] = sum;
    }
    workgroupBarrier();
    var total = vec3<f32>(0.0);
    for (var g = 0u; g < WG / size; g++) {
        total += subgroup_sums[g];
    }
    workgroupBarrier();
    return total;
}
