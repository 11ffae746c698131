// The residual block's LayerNorm backward with a row per subgroup (CPU adapters with
// SUBGROUP): in place of layer_norm/backward.wgsl's `layer_norm_backward_block_residual_dx`, as
// cpu/layer_norm/backward_rows.wgsl replaces the plain row-block pass (the walk is shared:
// cpu/layer_norm/rows_backward_walk.wgsl). The forward was h = residual + x·m, y = LN(h); here x is the
// saved h and d = dy:
//
//   dh = dx_LN (+ dh_in with FLAG_DH_IN)    dresidual = dh    dx = dh·m
//   layer_norm_backward_subgroup_rows_residual_dx   writing dx and dresidual, or (ACCUMULATE) adding to them
//
// Its layout binds 9 storage buffers: the host builds it only where the device allows that.

// #include "lib/philox.wgsl"
// #include "cpu/layer_norm/rows_lanes.wgsl"
// #include "cpu/layer_norm/rows_backward_walk.wgsl"
// #include "layer_norm/residual_emit.wgsl"
// #vec4-variant

// #activation @binding(1) read x (rows, W) h, the LN input
// #activation @binding(2) read dy (rows, W)
// #activation @binding(3) read_write dx (rows, W)
// #param @binding(4) weight (W) γ
// #activation @binding(11) read dh_in (rows, W)
// #activation @binding(12) read_write dresidual (rows, W)

const RESIDUAL: bool = true;

// Set per pipeline (pipeline-overridable constants, folded by the driver).
override ACCUMULATE: bool = false;  // dx and dresidual += instead of =
override TRIPLES: u32 = 8u;         // triples of column quads live per lane: 2, 4 or 8 (SG_TRIPLES)

@compute @workgroup_size(8)
fn layer_norm_backward_subgroup_rows_residual_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_block(wid.x + wid.y * nwg.x, lid, TRIPLES, false, ACCUMULATE);
}

// The residual block's dx and dresidual of row quad k (nothing past the row) from the
// LayerNorm's dh: dh (+ dh_in), and dh·m; written or, with `accumulate`, added to.
fn quad_residual(base: u32, k: u32, quads: u32, dh_ln: vec4<f32>, m: vec4<f32>, accumulate: bool) {
    if (k < quads) {
        residual_emit4(base + 4u * k, dh_ln, m, accumulate);
    }
}

// dx and dresidual of a triple of row quads: their three mask draws interleaved.
fn sg_emit3(base: u32, k: vec3<u32>, quads: u32, q: vec3<u32>, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, state: vec4<u32>, accumulate: bool) {
    let m = dropout_factors4x3(state, q, p.drop_threshold, p.drop_flags, p.drop_scale);
    quad_residual(base, k.x, quads, a, m.a, accumulate);
    quad_residual(base, k.y, quads, b, m.b, accumulate);
    quad_residual(base, k.z, quads, c, m.c, accumulate);
}
