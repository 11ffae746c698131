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
//   group_norm_backward_finalize (here)  one workgroup per group: mean − m̃ = Σ(x − m̃)/L
//            (exact from the data, as BatchNorm does), each channel's Σg·x̂ and Σg (kept for
//            dγ, dβ), A and B, and each channel's dx coefficients (m̃, a, q, r):
//            dx = a·g + q + r·(x − m̃), a = rstd·γ_c, r = −rstd²·B, q = −rstd·A − r·(mean − m̃).
//   group_norm_backward_params (here, affine only)  one invocation per channel: dγ, dβ summed
//            over the samples (written or added to).
//   batch_norm_backward_dx (_aligned where S % 4 == 0)  dx from the coefficients.
// Precision: f32 arithmetic; sums around the group's mean.

// #include "lib/workgroup_reduce.wgsl"
// #include "group_norm/params.wgsl"

const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> partials: array<vec4<f32>>; // (N·C, parts) (Σ(x − m̃), Σg, Σg·(x − m̃), 0), then (N·C) (Σg·x̂, Σg, 0, 0) from sums_base
@group(0) @binding(2) var<storage, read> weight: array<f32>;              // (C) γ
@group(0) @binding(3) var<storage, read> save_mean: array<f32>;           // (N, G)
@group(0) @binding(4) var<storage, read> save_rstd: array<f32>;           // (N, G)
@group(0) @binding(5) var<storage, read_write> coef: array<vec4<f32>>;    // (N, C) (m̃, a, q, r)
@group(0) @binding(6) var<storage, read_write> dweight: array<f32>;       // (C) dγ
@group(0) @binding(7) var<storage, read_write> dbias: array<f32>;         // (C) dβ

fn gamma(c: u32) -> f32 {
    if ((p.flags & FLAG_AFFINE) != 0u) {
        return weight[c];
    }
    return 1.0;
}

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
    let base = q * p.group_chans;             // (n, c) index of the group's channel 0
    let first = (q % p.g) * p.group_chans;    // its c
    let rstd = save_rstd[q];
    // Each invocation sums the chunks of channels lid, lid + WG, … and keeps (Σg, Σg·(x − m̃))
    // for them; the workgroup adds Σ(x − m̃).
    var sx = 0.0;
    for (var j = lid; j < p.group_chans; j += WG) {
        var t = vec3<f32>(0.0);
        for (var k = 0u; k < p.parts; k++) {
            t += partials[(base + j) * p.parts + k].xyz;
        }
        sx += t.x;
        partials[p.sums_base + base + j] = vec4<f32>(t.y, t.z, 0.0, 0.0);
    }
    let mean_shift = workgroup_sum3(lid, vec3<f32>(sx, 0.0, 0.0)).x / f32(p.count);
    // Per channel Σg·x̂ = rstd·(Σg·(x − m̃) − (mean − m̃)·Σg), and the γ-weighted totals.
    var mine = vec3<f32>(0.0);
    for (var j = lid; j < p.group_chans; j += WG) {
        let t = partials[p.sums_base + base + j];
        let sum_g = t.x;
        let sum_gx = rstd * (t.y - mean_shift * sum_g);
        partials[p.sums_base + base + j] = vec4<f32>(sum_gx, sum_g, 0.0, 0.0);
        let w = gamma(first + j);
        mine += vec3<f32>(w * sum_g, w * sum_gx, 0.0);
    }
    let totals = workgroup_sum3(lid, mine) / f32(p.count); // (A, B, 0)
    let r = -rstd * rstd * totals.y;
    let q0 = -rstd * totals.x - r * mean_shift;
    let centre = save_mean[q];
    for (var j = lid; j < p.group_chans; j += WG) {
        coef[base + j] = vec4<f32>(centre, rstd * gamma(first + j), q0, r);
    }
}

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
