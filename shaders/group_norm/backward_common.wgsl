// include-only: validated as part of the shaders that include it.
// What GroupNorm's backward finalize passes share (group_norm/backward.wgsl, a workgroup per
// group; cpu/group_norm/backward_serial.wgsl, an invocation per group): the uniform, the
// bindings, and the three steps of finishing a group, each over the channels first,
// first + stride, … of the group. The including shader declares `const WG: u32`.

// #include "group_norm/params.wgsl"

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

// Step 1: sums the chunks of group q's channels first, first + stride, …, keeps their
// (Σg, Σg·(x − m̃)) and returns their Σ(x − m̃).
fn channel_sums(q: u32, first: u32, stride: u32) -> f32 {
    let base = q * p.group_chans;
    var sx = 0.0;
    for (var j = first; j < p.group_chans; j += stride) {
        var t = vec3<f32>(0.0);
        for (var k = 0u; k < p.parts; k++) {
            t += partials[(base + j) * p.parts + k].xyz;
        }
        sx += t.x;
        partials[p.sums_base + base + j] = vec4<f32>(t.y, t.z, 0.0, 0.0);
    }
    return sx;
}

// Step 2, given mean − m̃ = Σ(x − m̃)/L: each channel's Σg·x̂ = rstd·(Σg·(x − m̃) − (mean − m̃)·Σg),
// kept with Σg for dγ, dβ; returns the channels' (Σγ·g, Σγ·g·x̂, 0).
fn channel_grads(q: u32, first: u32, stride: u32, mean_shift: f32) -> vec3<f32> {
    let base = q * p.group_chans;
    let c0 = (q % p.g) * p.group_chans;
    let rstd = save_rstd[q];
    var acc = vec3<f32>(0.0);
    for (var j = first; j < p.group_chans; j += stride) {
        let t = partials[p.sums_base + base + j];
        let sum_g = t.x;
        let sum_gx = rstd * (t.y - mean_shift * sum_g);
        partials[p.sums_base + base + j] = vec4<f32>(sum_gx, sum_g, 0.0, 0.0);
        let w = gamma(c0 + j);
        acc += vec3<f32>(w * sum_g, w * sum_gx, 0.0);
    }
    return acc;
}

// Step 3, given A = Σγ·g / L and B = Σγ·g·x̂ / L of the group: each channel's dx coefficients
// (m̃, a, q, r), dx = a·g + q + r·(x − m̃).
fn write_coefficients(q: u32, first: u32, stride: u32, mean_shift: f32, a_b: vec2<f32>) {
    let base = q * p.group_chans;
    let c0 = (q % p.g) * p.group_chans;
    let rstd = save_rstd[q];
    let r = -rstd * rstd * a_b.y;
    let q0 = -rstd * a_b.x - r * mean_shift;
    let centre = save_mean[q];
    for (var j = first; j < p.group_chans; j += stride) {
        coef[base + j] = vec4<f32>(centre, rstd * gamma(c0 + j), q0, r);
    }
}
