// include-only: validated as part of the shaders that include it.
// The row-per-subgroup LayerNorm backward's shared part (cpu/layer_norm/backward_rows.wgsl,
// cpu/layer_norm/residual_backward_rows.wgsl): the uniform and the bindings besides the
// activations (as layer_norm/backward.wgsl numbers them), and the block walk, sg_block. The
// includer declares the activations x, dy, dx and the parameter weight, `const RESIDUAL: bool`
// (whether sg_emit3 needs the generator state without LayerNorm → dropout), and
// fn sg_emit3(base: u32, k: vec3<u32>, quads: u32, q: vec3<u32>, a: vec4<f32>, b: vec4<f32>,
//             c: vec4<f32>, state: vec4<u32>, accumulate: bool)
// which writes the outputs of row quads k (global quads q; none past the row's `quads`) from
// their LayerNorm gradients a, b, c: its own call graph, so that each entry point's layout holds
// only the bindings it uses (the plain passes stay within 8 storage buffers).

// #include "lib/philox.wgsl"
// #include "cpu/layer_norm/rows_lanes.wgsl"

// RMSNorm instead of LayerNorm (see layer_norm/backward_common.wgsl): K = 0, no mean(g) term.
override RMS: bool = false;

const LANES: u32 = 8u;
const ROWS_PER_BLOCK: u32 = 64u;

// #include "layer_norm/backward_params.wgsl"

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(5) var<storage, read> rstd: array<f32>;                  // (rows)
@group(0) @binding(7) var<storage, read_write> partials: array<vec2<f32>>;  // (row_blocks, W) (Σd·x̂, Σd)
@group(0) @binding(10) var<storage, read> rng_state: vec4<u32>;            // (seed lo, seed hi, offset lo, offset hi)

// x − K of row quad k at element `base` (zeros past the row's `quads`).
fn quad_xs(base: u32, k: u32, quads: u32, shift: f32) -> vec4<f32> {
    if (k < quads) {
        return ld4a_x(base + 4u * k) - shift;
    }
    return vec4<f32>(0.0);
}

// dy of row quad k (zeros past the row).
fn quad_dy(base: u32, k: u32, quads: u32) -> vec4<f32> {
    if (k < quads) {
        return ld4a_dy(base + 4u * k);
    }
    return vec4<f32>(0.0);
}

// (Σ(x − K), Σg, Σg·(x − K)) of one quad, g = d·γ (zeros past the row give zeros).
fn quad_sums(xs: vec4<f32>, g: vec4<f32>) -> vec3<f32> {
    return vec3<f32>(dot(xs, vec4<f32>(1.0)), dot(g, vec4<f32>(1.0)), dot(g, xs));
}

// (x̂, dh) of a quad from xs = x − K, d, γ, rstd and the row's (mean − K, mean(g), mean(g·x̂)).
struct Grad {
    xhat: vec4<f32>,
    dh: vec4<f32>,
}

fn quad_grad(xs: vec4<f32>, d: vec4<f32>, gam: vec4<f32>, rs: f32, cf: vec3<f32>) -> Grad {
    let xhat = (xs - cf.x) * rs;
    return Grad(xhat, rs * (d * gam - cf.y - xhat * cf.z));
}

// The block's partials of row quad k (nothing past the row).
fn quad_partials(block: u32, k: u32, quads: u32, gx: vec4<f32>, gs: vec4<f32>) {
    if (k < quads) {
        let at = (p.block_base + block) * p.width + 4u * k;
        partials[at] = vec2<f32>(gx.x, gs.x);
        partials[at + 1u] = vec2<f32>(gx.y, gs.y);
        partials[at + 2u] = vec2<f32>(gx.z, gs.z);
        partials[at + 3u] = vec2<f32>(gx.w, gs.w);
    }
}

// Block `block` (64 rows) by one subgroup, `triples` (a constant) triples of quads per lane;
// with `drop` (a constant) d = dy·m, else dy. The includer's sg_emit3 writes each triple's
// outputs from the LayerNorm's dh (written or, with `accumulate`, added to).
fn sg_block(block: u32, lane: u32, triples: u32, drop: bool, accumulate: bool) {
    let quads = p.width >> 2u;
    var state = vec4<u32>(0u);
    if (drop || RESIDUAL) {
        state = load_state();
    }
    // γ and the block's column sums (Σd·x̂, Σd) of the lane's quads.
    // #unroll t 8
    let k{t} = triple_quads(lane, LANES, {t}u);
    var ga{t} = vec4<f32>(1.0);
    var gb{t} = vec4<f32>(1.0);
    var gc{t} = vec4<f32>(1.0);
    if ({t}u < triples) {
        ga{t} = quad_gamma(k{t}.x, quads);
        gb{t} = quad_gamma(k{t}.y, quads);
        gc{t} = quad_gamma(k{t}.z, quads);
    }
    var gxa{t} = vec4<f32>(0.0);
    var gxb{t} = vec4<f32>(0.0);
    var gxc{t} = vec4<f32>(0.0);
    var gsa{t} = vec4<f32>(0.0);
    var gsb{t} = vec4<f32>(0.0);
    var gsc{t} = vec4<f32>(0.0);
    // #end-unroll
    let first = block * ROWS_PER_BLOCK;
    let last = min(first + ROWS_PER_BLOCK, p.rows);
    for (var row = first; row < last; row++) {
        let base = row * p.width;
        let shift = select(ld_x(base), 0.0, RMS);
        let rs = rstd[p.row_base + row];
        let q0 = (p.row_base + row) * quads;
        // x − K and d = dy·m into registers; the row's sums.
        var sums = vec3<f32>(0.0);
        // #unroll t 8
        var xa{t} = vec4<f32>(0.0);
        var xb{t} = vec4<f32>(0.0);
        var xc{t} = vec4<f32>(0.0);
        var da{t} = vec4<f32>(0.0);
        var db{t} = vec4<f32>(0.0);
        var dc{t} = vec4<f32>(0.0);
        if ({t}u < triples) {
            xa{t} = quad_xs(base, k{t}.x, quads, shift);
            xb{t} = quad_xs(base, k{t}.y, quads, shift);
            xc{t} = quad_xs(base, k{t}.z, quads, shift);
            da{t} = quad_dy(base, k{t}.x, quads);
            db{t} = quad_dy(base, k{t}.y, quads);
            dc{t} = quad_dy(base, k{t}.z, quads);
            if (drop) {
                let m = dropout_factors4x3(state, vec3<u32>(q0) + k{t}, p.drop_threshold, p.drop_flags, p.drop_scale);
                da{t} *= m.a;
                db{t} *= m.b;
                dc{t} *= m.c;
            }
            sums += quad_sums(xa{t}, da{t} * ga{t}) + quad_sums(xb{t}, db{t} * gb{t}) + quad_sums(xc{t}, dc{t} * gc{t});
        }
        // #end-unroll
        let total = subgroupAdd(sums);
        let w = f32(p.width);
        var cf = vec3<f32>(0.0, 0.0, rs * total.z / w);
        if (!RMS) {
            let mk = total.x / w;
            cf = vec3<f32>(mk, total.y / w, rs * (total.z - mk * total.y) / w);
        }
        // dx from the registers; the columns' sums advance.
        // #unroll t 8
        if ({t}u < triples) {
            let a{t} = quad_grad(xa{t}, da{t}, ga{t}, rs, cf);
            let b{t} = quad_grad(xb{t}, db{t}, gb{t}, rs, cf);
            let c{t} = quad_grad(xc{t}, dc{t}, gc{t}, rs, cf);
            sg_emit3(base, k{t}, quads, vec3<u32>(q0) + k{t}, a{t}.dh, b{t}.dh, c{t}.dh, state, accumulate);
            gxa{t} += da{t} * a{t}.xhat;
            gxb{t} += db{t} * b{t}.xhat;
            gxc{t} += dc{t} * c{t}.xhat;
            gsa{t} += da{t};
            gsb{t} += db{t};
            gsc{t} += dc{t};
        }
        // #end-unroll
    }
    // #unroll t 8
    if ({t}u < triples) {
        quad_partials(block, k{t}.x, quads, gxa{t}, gsa{t});
        quad_partials(block, k{t}.y, quads, gxb{t}, gsb{t});
        quad_partials(block, k{t}.z, quads, gxc{t}, gsc{t});
    }
    // #end-unroll
}
