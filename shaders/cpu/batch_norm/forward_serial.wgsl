// BatchNorm forward statistics with one invocation per (channel, chunk) and one per channel,
// for CPU adapters (`ReduceSplit::Invocation`): in place of batch_norm/forward.wgsl's
// batch_norm_stats and batch_norm_finalize, with the same uniform, bindings, partials and
// results within rounding. No workgroup memory and no barriers: a CPU driver runs a workgroup's
// invocations a SIMD group at a time and pays for a workgroup merge more than for the loads it
// merges.
//
//   batch_norm_stats_serial      one invocation per (channel, chunk): the chunk's triple
//   batch_norm_finalize_serial   one invocation per channel: merges its partials in order

// #include "batch_norm/forward_common.wgsl"
// #vec4-variant

// batch_norm_stats with one invocation per (channel, chunk): no workgroup memory, no barriers. CPU
// adapters (see `ReduceSplit::Invocation`), where a workgroup merge costs more than the loads.
@compute @workgroup_size(256)
fn batch_norm_stats_serial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * WG;
    if (t >= p.c * p.chunks) {
        return;
    }
    let c = t / p.chunks;
    let k = t % p.chunks;
    let shift = stats_shift(c);
    let begin = k * p.chunk_len;
    publish_partial(c, k, shift, chunk_stat(c, begin, min(begin + p.chunk_len, p.m), 4u, shift));
}

// batch_norm_finalize with one invocation per channel merging all its partials in order: no workgroup
// memory, no barriers. Pairs with batch_norm_stats_serial (CPU adapters).
@compute @workgroup_size(64)
fn batch_norm_finalize_serial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= p.c) {
        return;
    }
    finish_channel(c, merge_partials(c, 0u, 1u));
}
