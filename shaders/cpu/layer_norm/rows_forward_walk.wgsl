// include-only: validated as part of the shaders that include it.
// The row-per-subgroup LayerNorm forward's shared part (cpu/layer_norm/forward_rows.wgsl,
// cpu/layer_norm/residual_forward_rows.wgsl): the uniform and the non-activation bindings (as
// layer_norm/forward.wgsl numbers them) and the block walk, sg_forward. A workgroup is one subgroup of
// LANES = 8 invocations (the host takes these passes only where the adapter's smallest subgroup
// has 8 lanes or more, so the 8 are one subgroup or part of one) and walks a block of 64 rows,
// the row-block path's grid: per row its quads into registers (lane ℓ: quads ℓ, ℓ + 8, …, as
// cpu/layer_norm/rows_lanes.wgsl lays them out), the exact two-pass statistics around K by two
// subgroupAdds of registers (the variance is never E[x²] − E[x]²), and y written from the
// registers; γ and β stay in registers for all 64 rows.
//
// The includer declares the activations (x, y and its own), the parameters weight and bias,
// and, as its own call graph so that each entry point's layout holds only what it binds:
//   fn sg_shift(base: u32) -> f32        K of the row starting at element `base`
//   fn sg_load3(base: u32, k: vec3<u32>, quads: u32, q: vec3<u32>, state: vec4<u32>, shift: f32) -> Quads3
//                                        the LayerNorm input minus K of row quads k (global
//                                        quads q; zeros past the row's `quads`)
//   fn sg_store3(base: u32, k: vec3<u32>, quads: u32, q: vec3<u32>, state: vec4<u32>, y: Quads3, drop: bool)
//                                        writes y of row quads k (none past the row)
//   const NEEDS_STATE: bool              whether sg_load3 reads the generator state

// #include "lib/philox.wgsl"
// #include "cpu/layer_norm/rows_lanes.wgsl"

const LANES: u32 = 8u;
const ROWS_PER_BLOCK: u32 = 64u;

// RMSNorm instead of LayerNorm (see layer_norm/forward_common.wgsl): K = 0, no centring,
// rstd = 1/sqrt(mean(h²) + eps).
override RMS: bool = false;

const FLAG_WEIGHT: u32 = 1u;     // multiply by γ
const FLAG_BIAS: u32 = 2u;       // add β

// #include "layer_norm/forward_params.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;  // (rows)
@group(0) @binding(6) var<storage, read_write> rstd_out: array<f32>;  // (rows)
@group(0) @binding(7) var<storage, read> rng_state: vec4<u32>;       // (seed lo, seed hi, offset lo, offset hi)

// Three quads of one lane's triple.
struct Quads3 {
    a: vec4<f32>,
    b: vec4<f32>,
    c: vec4<f32>,
}

// β of row quad k (zeros past the row's `quads`, or without β).
fn quad_beta(k: u32, quads: u32) -> vec4<f32> {
    if (k < quads && (p.flags & FLAG_BIAS) != 0u) {
        return ld4a_bias(4u * k);
    }
    return vec4<f32>(0.0);
}

// Σ of a quad's deviations squared, zero past the row.
fn quad_m2(v: vec4<f32>, mean: f32, inside: bool) -> f32 {
    let d = select(vec4<f32>(0.0), v - mean, inside);
    return dot(d, d);
}

// Block `block` by the subgroup, `triples` (a constant) triples of quads per lane; `drop` (a
// constant) goes to sg_store3 (LayerNorm → dropout).
fn sg_forward(block: u32, lane: u32, triples: u32, drop: bool) {
    let quads = p.width >> 2u;
    var state = vec4<u32>(0u);
    if (drop || NEEDS_STATE) {
        state = load_state();
    }
    // γ and β of the lane's quads, for all the block's rows.
    // #unroll t 8
    let k{t} = triple_quads(lane, LANES, {t}u);
    var ga{t} = vec4<f32>(1.0);
    var gb{t} = vec4<f32>(1.0);
    var gc{t} = vec4<f32>(1.0);
    var ba{t} = vec4<f32>(0.0);
    var bb{t} = vec4<f32>(0.0);
    var bc{t} = vec4<f32>(0.0);
    if ({t}u < triples) {
        ga{t} = quad_gamma(k{t}.x, quads);
        gb{t} = quad_gamma(k{t}.y, quads);
        gc{t} = quad_gamma(k{t}.z, quads);
        ba{t} = quad_beta(k{t}.x, quads);
        bb{t} = quad_beta(k{t}.y, quads);
        bc{t} = quad_beta(k{t}.z, quads);
    }
    // #end-unroll
    let first = block * ROWS_PER_BLOCK;
    let last = min(first + ROWS_PER_BLOCK, p.rows);
    for (var row = first; row < last; row++) {
        let base = row * p.width;
        let shift = select(sg_shift(base), 0.0, RMS);
        let q0 = vec3<u32>((p.row_base + row) * quads);
        // Load (shifted), and the lane's share of Σ (h − K).
        var sum = 0.0;
        // #unroll t 8
        var v{t} = Quads3(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
        if ({t}u < triples) {
            v{t} = sg_load3(base, k{t}, quads, q0 + k{t}, state, shift);
            sum += dot(v{t}.a + v{t}.b + v{t}.c, vec4<f32>(1.0));
        }
        // #end-unroll
        let mean = subgroupAdd(sum) / f32(p.width);
        var m2 = 0.0;
        // #unroll t 8
        if ({t}u < triples) {
            m2 += quad_m2(v{t}.a, mean, k{t}.x < quads) + quad_m2(v{t}.b, mean, k{t}.y < quads) + quad_m2(v{t}.c, mean, k{t}.z < quads);
        }
        // #end-unroll
        // RMSNorm: mean(h²) = var + mean², and the values are normalized uncentred.
        let rstd = 1.0 / sqrt(max(subgroupAdd(m2) / f32(p.width), 0.0) + select(0.0, mean * mean, RMS) + p.eps);
        let centre = select(mean, 0.0, RMS);
        if (lane == 0u) {
            mean_out[p.row_base + row] = shift + mean;
            rstd_out[p.row_base + row] = rstd;
        }
        // #unroll t 8
        if ({t}u < triples) {
            let y{t} = Quads3((v{t}.a - centre) * rstd * ga{t} + ba{t}, (v{t}.b - centre) * rstd * gb{t} + bb{t}, (v{t}.c - centre) * rstd * gc{t} + bc{t});
            sg_store3(base, k{t}, quads, q0 + k{t}, state, y{t}, drop);
        }
        // #end-unroll
    }
}
