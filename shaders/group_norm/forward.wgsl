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
//   group_norm_finalize (here)  one workgroup per group: Chan-merges its chunks, writes the
//                 saved mean and rstd (N, G), and each of its channels' (K, mean − K, rstd·γ_c,
//                 β_c) at index n·C + c.
//   batch_norm_normalize        on (1, N·C, S): a (sample, channel) is a BatchNorm channel with
//                 those coefficients: y = ((x − K) − (mean − K))·(rstd·γ) + β.
// Binding ranges: an input larger than one storage binding runs the two BatchNorm passes per
// range of whole groups; the uniform's chan_base and part_base place a range's channels in the
// per-call arrays.
// Precision: f32 arithmetic whatever the storage; statistics around K, never E[x²] − E[x]².

// #include "lib/workgroup_reduce.wgsl"
// #include "group_norm/params.wgsl"

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;   // (N·G, parts) (mean − K, M2, count, K)
@group(0) @binding(2) var<storage, read> weight: array<f32>;           // (C) γ
@group(0) @binding(3) var<storage, read> bias: array<f32>;             // (C) β
@group(0) @binding(4) var<storage, read_write> save_mean: array<f32>;  // (N, G)
@group(0) @binding(5) var<storage, read_write> save_rstd: array<f32>;  // (N, G)
@group(0) @binding(6) var<storage, read_write> coef: array<vec4<f32>>; // (N, C) (K, mean − K, rstd·γ, β)

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
    var mine = Stat(0.0, 0.0, 0.0);
    for (var k = lid; k < p.parts; k += WG) {
        let part = partials[q * p.parts + k];
        mine = chan_merge(mine, Stat(part.z, part.x, part.y));
    }
    let total = workgroup_merge(lid, mine);
    let shift = partials[q * p.parts].w;
    let rstd = 1.0 / sqrt(max(total.m2 / f32(p.count), 0.0) + p.eps);
    if (lid == 0u) {
        save_mean[q] = shift + total.mean;
        save_rstd[q] = rstd;
    }
    // Channel j of group q is (n, c) = (n, g·C/G + j), at n·C + c = q·C/G + j.
    let first = (q % p.g) * p.group_chans;
    for (var j = lid; j < p.group_chans; j += WG) {
        var scale = rstd;
        var beta = 0.0;
        if ((p.flags & FLAG_AFFINE) != 0u) {
            scale *= weight[first + j];
            beta = bias[first + j];
        }
        coef[q * p.group_chans + j] = vec4<f32>(shift, total.mean, scale, beta);
    }
}
