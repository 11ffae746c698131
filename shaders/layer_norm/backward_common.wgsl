// include-only: validated as part of the shaders that include it.
// What the LayerNorm backward's passes share (layer_norm/backward.wgsl, the GPU lane path and the
// dγ/dβ column reduction; cpu/layer_norm/backward_blocks.wgsl, the CPU row-block path): the
// uniform, the bindings, the override flags, γ (from `weight` or its uniform copy), a lane's
// row sums, the row coefficients and the output stores.

// #include "lib/philox.wgsl"
// #include "layer_norm/rows.wgsl"
// #include "layer_norm/backward_params.wgsl"
// #include "layer_norm/residual_emit.wgsl"

const WG: u32 = 256u;
const REGS: u32 = 16u;
const ROWS_PER_BLOCK: u32 = 64u;

// Variants, set per pipeline (pipeline-overridable constants): the driver compiles each as a
// constant and drops the untaken side, which a CPU driver would otherwise execute under a lane
// mask (both sides of every runtime branch).
override DROPOUT: bool = false;     // dy ← dy·m, LayerNorm → dropout's mask
override ACCUMULATE: bool = false;  // dx (and dresidual) += instead of =
// RMSNorm instead of LayerNorm (see layer_norm/forward_common.wgsl): K = 0, no mean(g) term.
override RMS: bool = false;

const FLAG_WEIGHT: u32 = 1u;
const FLAG_BIAS: u32 = 2u;
const FLAG_ACCUM_DX: u32 = 4u;       // dx (and dresidual) +=
const FLAG_ACCUM_PARAMS: u32 = 8u;   // dγ, dβ +=
// FLAG_DH_IN (32, residual block: add dh_in to dh) and residual_emit4: layer_norm/residual_emit.wgsl.

// The uniform's layout: layer_norm/backward_params.wgsl.

@group(0) @binding(0) var<uniform> p: Params;
// #activation @binding(1) read x (rows, W) LN input (h for the residual block)
// #activation @binding(2) read dy (rows, W)
// #activation @binding(3) read_write dx (rows, W)
// #param @binding(4) weight (W) γ
@group(0) @binding(5) var<storage, read> rstd: array<f32>;                  // (rows)
@group(0) @binding(6) var<storage, read_write> row_centre: array<vec2<f32>>; // (rows) (K, mean − K)
@group(0) @binding(7) var<storage, read_write> partials: array<vec2<f32>>;  // (row_blocks, W) (Σdy·x̂, Σdy)
@group(0) @binding(8) var<storage, read_write> dweight: array<f32>;         // (W)
@group(0) @binding(9) var<storage, read_write> dbias: array<f32>;           // (W)
@group(0) @binding(10) var<storage, read> rng_state: vec4<u32>;            // (seed lo, seed hi, offset lo, offset hi)
// #activation @binding(11) read dh_in (rows, W)
// #activation @binding(12) read_write dresidual (rows, W)
// γ of the first 4·GAMMA_QUADS columns as a uniform buffer, for the row-block pass's row phase,
// where every invocation reads all of γ once per row: lavapipe loads a uniform buffer as one
// vector gather, a storage buffer lane by lane with a branch per lane. With γ, layer_norm_backward_gamma_stage fills it (binding 14, the same buffer) before the
// pass; without γ the host created it holding ones. The other dx passes bind it without
// reading it.
const GAMMA_QUADS: u32 = 1024u;
@group(0) @binding(13) var<uniform> gamma_u: array<vec4<f32>, GAMMA_QUADS>;

fn has(flag: u32) -> bool {
    return (p.flags & flag) != 0u;
}

fn gamma(j: u32) -> f32 {
    return select(1.0, ld_weight(j), has(FLAG_WEIGHT));
}

// γ of columns j .. j + 3 (j a multiple of 4).
fn gamma4(j: u32) -> vec4<f32> {
    return select(vec4<f32>(1.0), ld4a_weight(j), has(FLAG_WEIGHT));
}

// γ of column j from the uniform copy when `staged` (a literal at every call; j <
// 4·GAMMA_QUADS), else from `weight`.
fn row_gamma(j: u32, staged: bool) -> f32 {
    if (staged) {
        return gamma_u[j >> 2u][j & 3u];
    }
    return gamma(j);
}

// (Σ(x − K), Σg, Σg·(x − K)) of one quad.
fn quad_sums(xs: vec4<f32>, g: vec4<f32>) -> vec3<f32> {
    return vec3<f32>(dot(xs, vec4<f32>(1.0)), dot(g, vec4<f32>(1.0)), dot(g, xs));
}

// (mean − K, mean(g), mean(g·x̂)) from a whole row's sums (Σ(x−K), Σg, Σg·(x−K)) and rstd r.
// RMSNorm (K = 0, no centring): (0, 0, mean(g·x̂)), so dx = r·(g − x̂·mean(g·x̂)).
fn coefficients_of(total: vec3<f32>, r: f32) -> vec3<f32> {
    let w = f32(p.width);
    if (RMS) {
        return vec3<f32>(0.0, 0.0, r * total.z / w);
    }
    let mk = total.x / w;
    return vec3<f32>(mk, total.y / w, r * (total.z - mk * total.y) / w);
}

// The row's shift K from its first input value: the value for LayerNorm, 0 for RMSNorm.
fn row_shift(first: f32) -> f32 {
    return select(first, 0.0, RMS);
}

// (Σ(x − K), Σg, Σg·(x − K)), g = dy·m·γ (m the mask's when `drop`), over the row's quads
// first, first + stride, … below `end` (none unless `live`), element by element (the scalar
// paths); γ from the uniform copy when `staged` (quads below GAMMA_QUADS only).
fn lane_sums(
    state: vec4<u32>, r: Row, shift: f32, first: u32, end: u32, stride: u32, live: bool, drop: bool, staged: bool,
) -> vec3<f32> {
    var sums = vec3<f32>(0.0);
    for (var k = first; live && k < end; k += stride) {
        let m = quad_factors(state, r, k, drop);
        for (var t = 0u; t < 4u; t++) {
            let j = column(r, k, t);
            if (j < p.width) {
                let xs = ld_x(r.base + j) - shift;
                let g = ld_dy(r.base + j) * m[t] * row_gamma(j, staged);
                sums += vec3<f32>(xs, g, g * xs);
            }
        }
    }
    return sums;
}

fn emit(out_index: u32, v: f32) {
    var out = v;
    if (has(FLAG_ACCUM_DX)) {
        out += ld_dx(out_index);
    }
    st_dx(out_index, out);
}

// The residual block's backward: x here is the saved h; dx is the gradient of the dropout's
// input (dh·m, m the multiplier of element e); dresidual = dh.
fn residual_emit(e: u32, dh_ln: f32, m: f32) {
    var dh = dh_ln;
    if (has(FLAG_DH_IN)) {
        dh += ld_dh_in(e);
    }
    var dres = dh;
    var dx = dh * m;
    if (has(FLAG_ACCUM_DX)) {
        dres += ld_dresidual(e);
        dx += ld_dx(e);
    }
    st_dresidual(e, dres);
    st_dx(e, dx);
}
