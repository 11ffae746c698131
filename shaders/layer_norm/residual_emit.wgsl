// include-only: validated as part of the shaders that include it.
// The residual block's backward outputs of one quad, shared by the lane and row-block passes
// (layer_norm/backward.wgsl) and the row-per-subgroup pass
// (cpu/layer_norm/residual_backward_rows.wgsl). The includer declares the uniform `p` (with
// `flags`) and the activations dh_in, dresidual and dx.

const FLAG_DH_IN: u32 = 32u;         // residual block: add dh_in to dh

// The quad from element e (a multiple of 4): dh = dh_ln (+ dh_in with FLAG_DH_IN),
// dresidual = dh and dx = dh·m (m the quad's mask multipliers), written or, with `accumulate`
// (a literal of the entry point), added to.
fn residual_emit4(e: u32, dh_ln: vec4<f32>, m: vec4<f32>, accumulate: bool) {
    var dh = dh_ln;
    if ((p.flags & FLAG_DH_IN) != 0u) {
        dh += ld4a_dh_in(e);
    }
    var dres = dh;
    var dx = dh * m;
    if (accumulate) {
        dres += ld4a_dresidual(e);
        dx += ld4a_dx(e);
    }
    st4_dresidual(e, dres, e + 4u);
    st4_dx(e, dx, e + 4u);
}
