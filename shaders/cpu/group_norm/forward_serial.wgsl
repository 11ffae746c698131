// GroupNorm's forward finalize with one invocation per group (pairs with BatchNorm's
// batch_norm_stats_serial on the group view: ReduceSplit::Invocation, the CPU adapters'
// default). A workgroup merge per group cost a CPU driver more than the whole forward's
// traffic (lavapipe, 8 × 64 × 28 × 28 in 256 groups: 7.2 ms against 0.58 ms for BatchNorm).
// Plans take it only while its loop stays within SERIAL_LOOP_MAX iterations
// (src/kernels/batch_norm.rs: CPU drivers stop a loop after 65535).
// The math is in group_norm/forward.wgsl.

// #include "group_norm/forward_common.wgsl"

const WG: u32 = 64u;

@compute @workgroup_size(64)
fn group_norm_finalize_serial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = gid.x + gid.y * nwg.x * WG;
    if (q >= p.groups) {
        return;
    }
    let st = finish_group(q, merge_group(q, 0u, 1u), true);
    write_coefficients(q, 0u, 1u, st);
}
