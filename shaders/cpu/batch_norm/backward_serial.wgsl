// BatchNorm backward reduce and finalize with one invocation per (channel, chunk) and one per
// channel, for CPU adapters (`ReduceSplit::Invocation`): in place of batch_norm/backward.wgsl's
// batch_norm_backward_reduce and batch_norm_backward_finalize, with the same uniform, bindings,
// flags, partials and results within rounding, and no workgroup memory or barriers.
//
//   batch_norm_backward_reduce_serial     one invocation per (channel, chunk): its three sums,
//                                         by DROPOUT, EVAL and PARK as the workgroup reduce
//   batch_norm_backward_finalize_serial   one invocation per channel: merges its partials

// #include "batch_norm/backward_common.wgsl"
// #vec4-variant

// batch_norm_backward_reduce with one invocation per (channel, chunk): no workgroup memory, no barriers (CPU
// adapters, `ReduceSplit::Invocation`).
@compute @workgroup_size(256)
fn batch_norm_backward_reduce_serial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    reduce_serial(gid.x + gid.y * nwg.x * WG, DROPOUT, EVAL, PARK);
}

fn reduce_serial(t: u32, drop: bool, eval: bool, park: bool) {
    if (t >= p.c * p.chunks) {
        return;
    }
    let c = t / p.chunks;
    let k = t % p.chunks;
    let centre = reduce_centre(c, eval);
    let begin = k * p.chunk_len;
    let sums = chunk_sums(c, begin, min(begin + p.chunk_len, p.m), 4u, centre, drop, eval, park);
    publish_partial(c, k, centre, sums, eval);
}

// batch_norm_backward_finalize with one invocation per channel summing its partials in order (pairs with
// batch_norm_backward_reduce_serial).
@compute @workgroup_size(64)
fn batch_norm_backward_finalize_serial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= p.c) {
        return;
    }
    finish_channel(c, sum_partials(c, 0u, 1u));
}
