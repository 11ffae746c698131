// GroupNorm's backward finalize with one invocation per group (pairs with BatchNorm's
// batch_norm_backward_reduce_serial on the (1, N·C, S) view: ReduceSplit::Invocation, the CPU
// adapters' default), for the reason given in cpu/group_norm/forward_serial.wgsl. The math is in
// group_norm/backward.wgsl.

// #include "group_norm/backward_common.wgsl"

const WG: u32 = 64u;

@compute @workgroup_size(64)
fn group_norm_backward_finalize_serial(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let q = gid.x + gid.y * nwg.x * WG;
    if (q >= p.groups) {
        return;
    }
    let mean_shift = channel_sums(q, 0u, 1u) / f32(p.count);
    let totals = channel_grads(q, 0u, 1u, mean_shift) / f32(p.count);
    write_coefficients(q, 0u, 1u, mean_shift, totals.xy);
}
