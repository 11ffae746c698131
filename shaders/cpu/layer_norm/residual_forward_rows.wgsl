// The pre-norm residual block's forward with a row per subgroup (CPU adapters with SUBGROUP):
// in place of layer_norm/forward.wgsl's `layer_norm_block_residual_dropout_forward`, as
// cpu/layer_norm/forward_rows.wgsl replaces the plain row-block pass (the walk is shared:
// cpu/layer_norm/rows_forward_walk.wgsl).
//
//   layer_norm_subgroup_rows_residual_dropout_forward   h = residual + x·m written out, y = LN(h) (TRIPLES as
//                                    in cpu/layer_norm/forward_rows.wgsl)
//
// h is formed on the way in (three interleaved mask draws per triple), written, and normalized
// from the registers: residual and x read once, h and y written once. Statistics around
// K = residual[r, 0] (h is not formed yet), as the row-block path. Its layout binds 9 storage
// buffers: the host builds it only where the device allows that.

// #include "lib/philox.wgsl"
// #include "cpu/layer_norm/rows_lanes.wgsl"
// #include "cpu/layer_norm/rows_forward_walk.wgsl"
// #vec4-variant

// #activation @binding(1) read x (rows, W)
// #activation @binding(2) read_write y (rows, W)
// #param @binding(3) weight (W) γ
// #param @binding(4) bias (W) β
// #activation @binding(8) read residual (rows, W)
// #activation @binding(9) read_write h (rows, W) residual + dropout(x)

const NEEDS_STATE: bool = true;

// Set per pipeline (a pipeline-overridable constant, folded by the driver).
override TRIPLES: u32 = 8u;  // triples of column quads live per lane: 2, 4 or 8 (SG_TRIPLES)

@compute @workgroup_size(8)
fn layer_norm_subgroup_rows_residual_dropout_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    sg_forward(wid.x + wid.y * nwg.x, lid, TRIPLES, false);
}

fn sg_shift(base: u32) -> f32 {
    return ld_residual(base);
}

// h = residual + x·m of row quad k, written; returns h − K (zeros past the row).
fn quad_h(base: u32, k: u32, quads: u32, m: vec4<f32>, shift: f32) -> vec4<f32> {
    if (k < quads) {
        let e = base + 4u * k;
        let hv = ld4a_residual(e) + ld4a_x(e) * m;
        st4_h(e, hv, e + 4u);
        return hv - shift;
    }
    return vec4<f32>(0.0);
}

fn sg_load3(base: u32, k: vec3<u32>, quads: u32, q: vec3<u32>, state: vec4<u32>, shift: f32) -> Quads3 {
    let m = dropout_factors4x3(state, q, p.drop_threshold, p.drop_flags, p.drop_scale);
    return Quads3(quad_h(base, k.x, quads, m.a, shift), quad_h(base, k.y, quads, m.b, shift), quad_h(base, k.z, quads, m.c, shift));
}

fn sg_store3(base: u32, k: vec3<u32>, quads: u32, q: vec3<u32>, state: vec4<u32>, y: Quads3, drop: bool) {
    if (k.x < quads) {
        st4_y(base + 4u * k.x, y.a, base + 4u * k.x + 4u);
    }
    if (k.y < quads) {
        st4_y(base + 4u * k.y, y.b, base + 4u * k.y + 4u);
    }
    if (k.z < quads) {
        st4_y(base + 4u * k.z, y.c, base + 4u * k.z + 4u);
    }
}
