// LayerNorm backward with a row per subgroup, for CPU adapters with SUBGROUP (lavapipe): in
// place of the row-block dx pass (layer_norm_backward.wgsl, `lnb_block_dx*`), with its
// bindings, uniform, mask and partials layout, so lnb_params_final sums its partials as it
// sums the row-block pass's. Same math as there:
//
//   x̂ = (x − mean)·rstd    g = dy·γ    dx = rstd·(g − mean_j(g) − x̂·mean_j(g·x̂))
//   partials[block, j] = (Σ_rows d·x̂, Σ_rows d) over the block's 64 rows, d = dy (·m)
//
//   lnb_sg_dx[_dropout][_accumulate]_T   LayerNorm, or LayerNorm → dropout (d = dy·m);
//                                         writing dx, or adding to it
//
// Why: the row-block pass reads every row twice (row phase, column phase) and every row's
// coefficients from workgroup memory once per three column quads, each access lane by lane on
// a CPU driver. Here a workgroup is one subgroup of 8 invocations (the host takes this path
// only where the adapter's smallest subgroup has 8 lanes or more, so the 8 are one subgroup or
// part of one) that walks a block of 64 rows: it holds a row's x − K and d in registers, sums
// the row with one subgroupAdd of three values, writes dx from the registers, and keeps its
// columns' γ and partial sums in registers for the whole block. x and dy are read once, dx
// written once, and nothing goes through workgroup memory. Lane ℓ takes the row's quads as
// ln_subgroup_rows.wgsl lays them out, T triples of them (the `_T` of the entry point).
//
// Precision: as the row-block pass: sums around K = x[r, 0], mean − K recomputed from Σ(x − K).

// #include "philox.wgsl"
// #include "ln_subgroup_rows.wgsl"
// #vec4-variant

const LANES: u32 = 8u;
const ROWS_PER_BLOCK: u32 = 64u;

// Mirrors `LnBackwardParams` in src/kernels/layer_norm_backward.rs.
struct Params {
    rows: u32,
    width: u32,
    flags: u32,
    row_blocks: u32,
    drop_threshold: u32,
    drop_flags: u32,
    drop_scale: f32,
    col_tiles: u32,
    lanes: u32,
    row_base: u32,   // global index of this dispatch's row 0 (chunked calls)
    block_base: u32, // global index of this dispatch's first block of 64 rows
    total_blocks: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// #activation @binding(1) read x (rows, W) LN input
// #activation @binding(2) read dy (rows, W)
// #activation @binding(3) read_write dx (rows, W)
// #param @binding(4) weight (W) γ
@group(0) @binding(5) var<storage, read> rstd: array<f32>;                  // (rows)
@group(0) @binding(7) var<storage, read_write> partials: array<vec2<f32>>;  // (row_blocks, W) (Σd·x̂, Σd)
@group(0) @binding(10) var<storage, read> rng_state: vec4<u32>;            // (seed lo, seed hi, offset lo, offset hi)

// One entry point per (dropout, accumulate, triples); all one shape.
@compute @workgroup_size(8)
fn lnb_sg_dx_2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_backward(wid.x + wid.y * nwg.x, lid, 2u, false, false);
}

@compute @workgroup_size(8)
fn lnb_sg_dx_4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_backward(wid.x + wid.y * nwg.x, lid, 4u, false, false);
}

@compute @workgroup_size(8)
fn lnb_sg_dx_8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_backward(wid.x + wid.y * nwg.x, lid, 8u, false, false);
}

@compute @workgroup_size(8)
fn lnb_sg_dx_dropout_2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_backward(wid.x + wid.y * nwg.x, lid, 2u, true, false);
}

@compute @workgroup_size(8)
fn lnb_sg_dx_dropout_4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_backward(wid.x + wid.y * nwg.x, lid, 4u, true, false);
}

@compute @workgroup_size(8)
fn lnb_sg_dx_dropout_8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_backward(wid.x + wid.y * nwg.x, lid, 8u, true, false);
}

@compute @workgroup_size(8)
fn lnb_sg_dx_accumulate_2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_backward(wid.x + wid.y * nwg.x, lid, 2u, false, true);
}

@compute @workgroup_size(8)
fn lnb_sg_dx_accumulate_4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_backward(wid.x + wid.y * nwg.x, lid, 4u, false, true);
}

@compute @workgroup_size(8)
fn lnb_sg_dx_accumulate_8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_backward(wid.x + wid.y * nwg.x, lid, 8u, false, true);
}

@compute @workgroup_size(8)
fn lnb_sg_dx_dropout_accumulate_2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_backward(wid.x + wid.y * nwg.x, lid, 2u, true, true);
}

@compute @workgroup_size(8)
fn lnb_sg_dx_dropout_accumulate_4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_backward(wid.x + wid.y * nwg.x, lid, 4u, true, true);
}

@compute @workgroup_size(8)
fn lnb_sg_dx_dropout_accumulate_8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_backward(wid.x + wid.y * nwg.x, lid, 8u, true, true);
}

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

// dx of row quad k (nothing past the row): dh, or dx + dh with `accumulate` (a literal).
fn quad_emit(base: u32, k: u32, quads: u32, dh: vec4<f32>, accumulate: bool) {
    if (k < quads) {
        let e = base + 4u * k;
        if (accumulate) {
            st4_dx(e, ld4a_dx(e) + dh, e + 4u);
        } else {
            st4_dx(e, dh, e + 4u);
        }
    }
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

// Block `block` (64 rows) by one subgroup, `triples` (a literal) triples of quads per lane;
// with `drop` (a literal) d = dy·m, else dy; dx written or, with `accumulate`, added to.
fn sg_backward(block: u32, lane: u32, triples: u32, drop: bool, accumulate: bool) {
    let quads = p.width >> 2u;
    var state = vec4<u32>(0u);
    if (drop) {
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
        let shift = ld_x(base);
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
        let mk = total.x / w;
        let cf = vec3<f32>(mk, total.y / w, rs * (total.z - mk * total.y) / w);
        // dx from the registers; the columns' sums advance.
        // #unroll t 8
        if ({t}u < triples) {
            let a{t} = quad_grad(xa{t}, da{t}, ga{t}, rs, cf);
            let b{t} = quad_grad(xb{t}, db{t}, gb{t}, rs, cf);
            let c{t} = quad_grad(xc{t}, dc{t}, gc{t}, rs, cf);
            quad_emit(base, k{t}.x, quads, a{t}.dh, accumulate);
            quad_emit(base, k{t}.y, quads, b{t}.dh, accumulate);
            quad_emit(base, k{t}.z, quads, c{t}.dh, accumulate);
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
