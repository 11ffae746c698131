// include-only: validated as part of the shaders that include it.
// What GroupNorm's forward finalize passes share (group_norm/forward.wgsl, a workgroup per group;
// cpu/group_norm/forward_serial.wgsl, an invocation per group): the uniform, the bindings, and
// the steps of finishing a group, each over the channels first, first + stride, … of the group.
// The including shader declares `const WG: u32`.

// #include "lib/welford.wgsl"
// #include "group_norm/params.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;   // (N·G, parts) (mean − K, M2, count, K)
@group(0) @binding(2) var<storage, read> weight: array<f32>;           // (C) γ
@group(0) @binding(3) var<storage, read> bias: array<f32>;             // (C) β
@group(0) @binding(4) var<storage, read_write> save_mean: array<f32>;  // (N, G)
@group(0) @binding(5) var<storage, read_write> save_rstd: array<f32>;  // (N, G)
@group(0) @binding(6) var<storage, read_write> coef: array<vec4<f32>>; // (N, C) (K, mean − K, rstd·γ, β)

// Chan merge of group q's partials first, first + stride, … (< parts).
fn merge_group(q: u32, first: u32, stride: u32) -> Stat {
    var acc = Stat(0.0, 0.0, 0.0);
    for (var k = first; k < p.parts; k += stride) {
        let part = partials[q * p.parts + k];
        acc = chan_merge(acc, Stat(part.z, part.x, part.y));
    }
    return acc;
}

// (K, mean − K, rstd) of group q from its merged triple; `save`: also writes the saved mean
// and rstd.
fn finish_group(q: u32, total: Stat, save: bool) -> vec3<f32> {
    let shift = partials[q * p.parts].w;
    let rstd = 1.0 / sqrt(max(total.m2 / f32(p.count), 0.0) + p.eps);
    if (save) {
        save_mean[q] = shift + total.mean;
        save_rstd[q] = rstd;
    }
    return vec3<f32>(shift, total.mean, rstd);
}

// The normalize coefficients of group q's channels first, first + stride, …: channel j is
// (n, c) = (n, g·C/G + j), stored at n·C + c = q·C/G + j.
fn write_coefficients(q: u32, first: u32, stride: u32, st: vec3<f32>) {
    let c0 = (q % p.g) * p.group_chans;
    for (var j = first; j < p.group_chans; j += stride) {
        var scale = st.z;
        var beta = 0.0;
        if ((p.flags & FLAG_AFFINE) != 0u) {
            scale *= weight[c0 + j];
            beta = bias[c0 + j];
        }
        coef[q * p.group_chans + j] = vec4<f32>(st.x, st.y, scale, beta);
    }
}
