// LayerNorm backward with a row per subgroup, for CPU adapters with SUBGROUP (lavapipe): in
// place of the row-block dx pass (layer_norm/backward.wgsl, `layer_norm_backward_block_dx`), with its
// bindings, uniform, mask and partials layout, so layer_norm_backward_params_final sums its partials as it
// sums the row-block pass's. Same math as there:
//
//   x̂ = (x − mean)·rstd    g = dy·γ    dx = rstd·(g − mean_j(g) − x̂·mean_j(g·x̂))
//   partials[block, j] = (Σ_rows d·x̂, Σ_rows d) over the block's 64 rows, d = dy (·m)
//
//   layer_norm_backward_subgroup_rows_dx   LayerNorm, or LayerNorm → dropout (DROPOUT: d = dy·m); writing dx, or
//               adding to it (ACCUMULATE)
//   (the residual block's: cpu/layer_norm/residual_backward_rows.wgsl)
//
// Why: the row-block pass reads every row twice (row phase, column phase) and every row's
// coefficients from workgroup memory once per three column quads, each access lane by lane on
// a CPU driver. Here a workgroup is one subgroup of 8 invocations (the host takes this path
// only where the adapter's smallest subgroup has 8 lanes or more, so the 8 are one subgroup or
// part of one) that walks a block of 64 rows: it holds a row's x − K and d in registers, sums
// the row with one subgroupAdd of three values, writes dx from the registers, and keeps its
// columns' γ and partial sums in registers for the whole block. x and dy are read once, dx
// written once, and nothing goes through workgroup memory. Lane ℓ takes the row's quads as
// cpu/layer_norm/rows_lanes.wgsl lays them out, TRIPLES triples of them.
//
// Precision: as the row-block pass: sums around K = x[r, 0], mean − K recomputed from Σ(x − K).

// #include "lib/philox.wgsl"
// #include "cpu/layer_norm/rows_lanes.wgsl"
// #include "cpu/layer_norm/rows_backward_walk.wgsl"
// #vec4-variant

// #activation @binding(1) read x (rows, W) LN input
// #activation @binding(2) read dy (rows, W)
// #activation @binding(3) read_write dx (rows, W)
// #param @binding(4) weight (W) γ

const RESIDUAL: bool = false;

// Set per pipeline (pipeline-overridable constants, folded by the driver).
override DROPOUT: bool = false;     // d = dy·m, LayerNorm → dropout's mask
override ACCUMULATE: bool = false;  // dx += instead of =
override TRIPLES: u32 = 8u;         // triples of column quads live per lane: 2, 4 or 8 (SG_TRIPLES)

@compute @workgroup_size(8)
fn layer_norm_backward_subgroup_rows_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_block(wid.x + wid.y * nwg.x, lid, TRIPLES, DROPOUT, ACCUMULATE);
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

// dx of a triple of row quads.
fn sg_emit3(base: u32, k: vec3<u32>, quads: u32, q: vec3<u32>, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, state: vec4<u32>, accumulate: bool) {
    quad_emit(base, k.x, quads, a, accumulate);
    quad_emit(base, k.y, quads, b, accumulate);
    quad_emit(base, k.z, quads, c, accumulate);
}
