// GroupNorm forward over an (N, C, *) tensor viewed as (N, C, S), with G groups of C/G
// consecutive channels. Group q = n·G + g holds L = C/G·S contiguous elements:
//
//   mean_q   = (1/L) Σ x                     over the group's channels and positions
//   var_q    = (1/L) Σ (x − mean_q)²         biased
//   rstd_q   = 1 / sqrt(var_q + eps)
//   y[n,c,s] = (x[n,c,s] − mean_q)·rstd_q·γ_c + β_c
//
// A call records three passes. The first and last are BatchNorm's own entry points
// (batch_norm/forward.wgsl), dispatched on views of the same memory:
//   batch_norm_stats (_serial on CPU adapters)  on (1, N·G, L): a group is a BatchNorm channel,
//                 cut into chunks over as many workgroups as its size needs (one group of
//                 millions of elements still fills a GPU); each chunk writes (mean − K, M2,
//                 count, K) with K the group's first value.
//   group_norm_finalize (here)  one workgroup per group (group_norm_finalize_serial in
//                 cpu/group_norm/forward_serial.wgsl: one invocation per group, with the
//                 BatchNorm _serial statistics on CPU adapters): Chan-merges its chunks, writes the
//                 saved mean and rstd (N, G), and each of its channels' (K, mean − K, rstd·γ_c,
//                 β_c) at index n·C + c.
//   batch_norm_normalize        on (1, N·C, S): a (sample, channel) is a BatchNorm channel with
//                 those coefficients: y = ((x − K) − (mean − K))·(rstd·γ) + β.
// Binding ranges: an input larger than one storage binding runs the two BatchNorm passes per
// range of whole groups; the uniform's chan_base and part_base place a range's channels in the
// per-call arrays.
// Precision: f32 arithmetic whatever the storage; statistics around K, never E[x²] − E[x]².

// #include "lib/workgroup_reduce.wgsl"
// #include "group_norm/forward_common.wgsl"

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn group_norm_finalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let q = wid.x + wid.y * nwg.x;
    if (q >= p.groups) {
        return; // padding workgroup of a folded dispatch (uniform across the workgroup)
    }
    let total = workgroup_merge(lid, merge_group(q, lid, WG));
    write_coefficients(q, lid, WG, finish_group(q, total, lid == 0u));
}
