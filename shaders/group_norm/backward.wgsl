// GroupNorm backward from the forward's saved (N, G) mean and rstd. With x̂ = (x − mean)·rstd
// and g = dy, over group q's L elements:
//
//   dx    = rstd·(γ_c·g − A − x̂·B),  A = (1/L) Σ γ_c·g,  B = (1/L) Σ γ_c·g·x̂
//   dγ_c  = Σ_{n,s} g·x̂             dβ_c = Σ_{n,s} g
//
// Passes; the first and last are BatchNorm's backward entry points (batch_norm/backward.wgsl)
// on the (1, N·C, S) view, where a (sample, channel) is a BatchNorm channel:
//   batch_norm_backward_reduce (_serial on CPU adapters)  without batch statistics, so each
//            (n, c) is centred on its group's saved mean m̃ (save_mean[(n·C + c)/(C/G)]):
//            Σ(x − m̃), Σg, Σg·(x − m̃) per chunk.
//   group_norm_backward_finalize (here)  one workgroup per group (_serial in
//            cpu/group_norm/backward_serial.wgsl: one invocation per group, on CPU adapters): mean − m̃ = Σ(x − m̃)/L
//            (exact from the data, as BatchNorm does), each channel's Σg·x̂ and Σg (kept for
//            dγ, dβ), A and B, and each channel's dx coefficients (m̃, a, q, r):
//            dx = a·g + q + r·(x − m̃), a = rstd·γ_c, r = −rstd²·B, q = −rstd·A − r·(mean − m̃).
//   group_norm_backward_params (here, affine only)  one invocation per channel: dγ, dβ summed
//            over the samples (written or added to).
//   batch_norm_backward_dx (_aligned where S % 4 == 0)  dx from the coefficients.
// Precision: f32 arithmetic; sums around the group's mean.

// #include "lib/workgroup_reduce.wgsl"
// #include "group_norm/backward_common.wgsl"

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn group_norm_backward_finalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let q = wid.x + wid.y * nwg.x;
    if (q >= p.groups) {
        return; // padding workgroup of a folded dispatch (uniform across the workgroup)
    }
    let sx = workgroup_sum3(lid, vec3<f32>(channel_sums(q, lid, WG), 0.0, 0.0)).x;
    let mean_shift = sx / f32(p.count);
    let totals = workgroup_sum3(lid, channel_grads(q, lid, WG, mean_shift)) / f32(p.count);
    write_coefficients(q, lid, WG, mean_shift, totals.xy);
}

// dγ, dβ of channel c: the per-(n, c) sums added over the samples (written or added to).
@compute @workgroup_size(64)
fn group_norm_backward_params(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= p.c) {
        return;
    }
    var s = vec2<f32>(0.0);
    for (var n = 0u; n < p.n; n++) {
        s += partials[p.sums_base + n * p.c + c].xy;
    }
    let accumulate = (p.flags & FLAG_ACCUM_PARAMS) != 0u;
    dweight[c] = select(0.0, dweight[c], accumulate) + s.x;
    dbias[c] = select(0.0, dbias[c], accumulate) + s.y;
}
