// include-only: validated as part of the shaders that include it.
// What the LayerNorm forward's passes share (layer_norm/forward.wgsl, the GPU lane path;
// cpu/layer_norm/forward_blocks.wgsl, the CPU row-block path): the uniform, the bindings, the
// override flag, γ and β, and a lane's Welford triple over its quads of a row.

// #include "lib/welford.wgsl"
// #include "lib/philox.wgsl"
// #include "layer_norm/rows.wgsl"
// #include "layer_norm/forward_params.wgsl"

const WG: u32 = 256u;
const REGS: u32 = 16u;

// Set per pipeline (a pipeline-overridable constant): the driver compiles it as a constant and
// drops the untaken side, which a CPU driver would otherwise execute under a lane mask.
override DROPOUT: bool = false;  // y ← y·m, the fused dropout's mask (layer_norm_forward, layer_norm_block_forward)
// RMSNorm instead of LayerNorm: y = h·rsqrt(mean(h²) + eps)·γ, no centring (K = 0, centre 0).
// The RMSNorm kernels set it on every pipeline; LayerNorm's never do.
override RMS: bool = false;

const FLAG_WEIGHT: u32 = 1u;     // multiply by γ
const FLAG_BIAS: u32 = 2u;       // add β

// The uniform's layout: layer_norm/forward_params.wgsl.

@group(0) @binding(0) var<uniform> p: Params;
// #activation @binding(1) read x (rows, W)
// #activation @binding(2) read_write y (rows, W)
// #param @binding(3) weight (W) γ
// #param @binding(4) bias (W) β
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;  // (rows)
@group(0) @binding(6) var<storage, read_write> rstd_out: array<f32>;  // (rows)
@group(0) @binding(7) var<storage, read> rng_state: vec4<u32>;       // (seed lo, seed hi, offset lo, offset hi)
// #activation @binding(8) read residual (rows, W)
// #activation @binding(9) read_write h (rows, W) residual + dropout(x)

// The row's shift K from its first value: the value itself for LayerNorm, 0 for RMSNorm (which
// normalizes h as it is).
fn row_shift(first: f32) -> f32 {
    return select(first, 0.0, RMS);
}

// (centre, rstd) of a row from the merged triple of its values shifted by K: LayerNorm
// (mean − K, 1/sqrt(var + eps)); RMSNorm (K = 0) (0, 1/sqrt(mean(h²) + eps)) with
// mean(h²) = var + mean², two non-negative terms (nothing cancels).
fn row_norm(total: Stat) -> vec2<f32> {
    let var_ = max(total.m2 / f32(p.width), 0.0);
    if (RMS) {
        return vec2<f32>(0.0, 1.0 / sqrt(var_ + total.mean * total.mean + p.eps));
    }
    return vec2<f32>(total.mean, 1.0 / sqrt(var_ + p.eps));
}

// γ and β of column j applied to a normalized value.
fn affine(j: u32, v: f32) -> f32 {
    var r = v;
    if ((p.flags & FLAG_WEIGHT) != 0u) {
        r = r * ld_weight(j);
    }
    if ((p.flags & FLAG_BIAS) != 0u) {
        r = r + ld_bias(j);
    }
    return r;
}

// affine of columns j .. j + 3.
fn affine4(j: u32, v: vec4<f32>) -> vec4<f32> {
    var r = v;
    if ((p.flags & FLAG_WEIGHT) != 0u) {
        r = r * ld4a_weight(j);
    }
    if ((p.flags & FLAG_BIAS) != 0u) {
        r = r + ld4a_bias(j);
    }
    return r;
}

// Welford triple of x − K over the row's quads first, first + stride, … (none unless `live`):
// in the vec4 variant a quad's exact triple per step, else one value per step.
fn lane_stat(r: Row, shift: f32, first: u32, stride: u32, live: bool) -> Stat {
    var acc = Stat(0.0, 0.0, 0.0);
    for (var k = first; live && k < r.quads; k += stride) {
        if (VEC4) {
            acc = chan_merge(acc, quad_stat(ld4a_x(r.base + 4u * k) - shift));
        } else {
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (j < p.width) {
                    acc = welford_add(acc, ld_x(r.base + j) - shift);
                }
            }
        }
    }
    return acc;
}

// The residual block's h = residual + x·m over the row's quads first, first + stride, … (none
// unless `live`), written out; returns the Welford triple of h − K (rounded to the storage
// type first, so that it is the h read back later).
fn lane_residual_stat(r: Row, shift: f32, state: vec4<u32>, first: u32, stride: u32, live: bool) -> Stat {
    var acc = Stat(0.0, 0.0, 0.0);
    for (var k = first; live && k < r.quads; k += stride) {
        let m = drop4(state, r.q0 + k);
        if (VEC4) {
            let e = r.base + 4u * k;
            let hv = ld4a_residual(e) + ld4a_x(e) * m;
            st4_h(e, hv, e + 4u);
            acc = chan_merge(acc, quad_stat(hv - shift));
        } else {
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (j < p.width) {
                    let e = r.base + j;
                    let hv = to_storage(ld_residual(e) + ld_x(e) * m[t]);
                    st_h(e, hv);
                    acc = welford_add(acc, hv - shift);
                }
            }
        }
    }
    return acc;
}
