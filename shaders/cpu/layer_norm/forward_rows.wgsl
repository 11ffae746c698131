// LayerNorm forward with a row per subgroup, for CPU adapters with SUBGROUP (lavapipe): the
// same results as layer_norm/forward.wgsl's row-block path (same bindings, uniform, grid and mask)
// within rounding.
//
//   layer_norm_subgroup_rows_forward   y = LN(x); with DROPOUT, y = LN(x)·m
//
// Why: a CPU driver runs a subgroup (8 invocations on lavapipe) as one SIMD thread and loads
// and stores storage and workgroup memory lane by lane, so a LayerNorm costs what its memory
// accesses cost. The row-block path reads x twice and every row's statistics from workgroup
// memory; here a subgroup holds its row in registers and reduces it with subgroupAdd (no
// workgroup memory, no barrier): x read once, y written once, γ and β read once per 64-row
// block. The walk is cpu/layer_norm/rows_forward_walk.wgsl's; the TRIPLES constant is the
// triples of quads per lane a pipeline keeps (cpu/layer_norm/rows_lanes.wgsl). Only the vec4 variant (f32, W % 4 == 0) is
// ever bound. Statistics around K = x[r, 0].

// #include "lib/philox.wgsl"
// #include "cpu/layer_norm/rows_lanes.wgsl"
// #include "cpu/layer_norm/rows_forward_walk.wgsl"
// #vec4-variant

// #activation @binding(1) read x (rows, W)
// #activation @binding(2) read_write y (rows, W)
// #param @binding(3) weight (W) γ
// #param @binding(4) bias (W) β

const NEEDS_STATE: bool = false;

// Set per pipeline (pipeline-overridable constants, folded by the driver).
override DROPOUT: bool = false;  // y ← y·m, the fused dropout's mask
override TRIPLES: u32 = 8u;      // triples of column quads live per lane: 2, 4 or 8 (SG_TRIPLES)

@compute @workgroup_size(8)
fn layer_norm_subgroup_rows_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_forward(wid.x + wid.y * nwg.x, lid, TRIPLES, DROPOUT);
}

// x − K of row quad k (zeros past the row).
fn quad_x(base: u32, k: u32, quads: u32, shift: f32) -> vec4<f32> {
    if (k < quads) {
        return ld4a_x(base + 4u * k) - shift;
    }
    return vec4<f32>(0.0);
}

fn sg_shift(base: u32) -> f32 {
    return ld_x(base);
}

fn sg_load3(base: u32, k: vec3<u32>, quads: u32, q: vec3<u32>, state: vec4<u32>, shift: f32) -> Quads3 {
    return Quads3(quad_x(base, k.x, quads, shift), quad_x(base, k.y, quads, shift), quad_x(base, k.z, quads, shift));
}

fn quad_store(base: u32, k: u32, quads: u32, v: vec4<f32>) {
    if (k < quads) {
        st4_y(base + 4u * k, v, base + 4u * k + 4u);
    }
}

// y, times the mask with `drop` (three interleaved Philox calls).
fn sg_store3(base: u32, k: vec3<u32>, quads: u32, q: vec3<u32>, state: vec4<u32>, y: Quads3, drop: bool) {
    var m = Factors3(vec4<f32>(1.0), vec4<f32>(1.0), vec4<f32>(1.0));
    if (drop) {
        m = dropout_factors4x3(state, q, p.drop_threshold, p.drop_flags, p.drop_scale);
    }
    quad_store(base, k.x, quads, y.a * m.a);
    quad_store(base, k.y, quads, y.b * m.b);
    quad_store(base, k.z, quads, y.c * m.c);
}
