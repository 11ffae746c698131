// include-only: validated as part of the shaders that include it.
// Workgroup-wide reductions of BatchNorm's ReduceSplit::Workgroup passes, through workgroup
// memory only: the path for devices without SUBGROUP (and for ContextOptions::disable_subgroups).
// lib/workgroup_reduce_subgroup.wgsl replaces this file, function for function, when the device has
// SUBGROUP (shader_source::SUBGROUP_ALTERNATIVES). Results agree within rounding.
//
// The including shader declares `const WG: u32 = 256u`. Every invocation of the workgroup must
// call, in uniform control flow.

// #include "lib/welford.wgsl"

var<workgroup> shared_sums: array<vec3<f32>, WG>;

// Merges every invocation's triple; every invocation gets the workgroup's total. Two levels
// instead of a log2(WG)-deep tree: 16 invocations each fold 16 entries, then one folds the 16
// partials. Four barriers instead of ten matters on CPU drivers (lavapipe), where every
// barrier switches between the workgroup's fibers; on GPUs the two short loops cost nothing.
// Requires WG = 256.
const FOLD: u32 = 16u;

fn workgroup_merge(lid: u32, mine: Stat) -> Stat {
    shared_stat[lid] = mine;
    workgroupBarrier();
    if (lid < FOLD) {
        var acc = shared_stat[lid * FOLD];
        for (var k = 1u; k < FOLD; k++) {
            acc = chan_merge(acc, shared_stat[lid * FOLD + k]);
        }
        shared_stat[lid * FOLD] = acc;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var acc = shared_stat[0];
        for (var k = 1u; k < FOLD; k++) {
            acc = chan_merge(acc, shared_stat[k * FOLD]);
        }
        shared_stat[0] = acc;
    }
    workgroupBarrier();
    let total = shared_stat[0];
    // Keep the next call from overwriting shared_stat[0] before everyone has read it.
    workgroupBarrier();
    return total;
}

// Sums every invocation's vector; every invocation gets the workgroup's total.
fn workgroup_sum3(lid: u32, mine: vec3<f32>) -> vec3<f32> {
    // Two levels (16 × 16), as workgroup_merge.
    shared_sums[lid] = mine;
    workgroupBarrier();
    if (lid < FOLD) {
        var acc = vec3<f32>(0.0);
        for (var k = 0u; k < FOLD; k++) {
            acc += shared_sums[lid * FOLD + k];
        }
        shared_sums[lid * FOLD] = acc;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var acc = vec3<f32>(0.0);
        for (var k = 0u; k < FOLD; k++) {
            acc += shared_sums[k * FOLD];
        }
        shared_sums[0] = acc;
    }
    workgroupBarrier();
    let total = shared_sums[0];
    workgroupBarrier();
    return total;
}
