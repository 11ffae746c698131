// include-only: validated as part of the shaders that include it.
// The row-block paths' column tiles (cpu/layer_norm/forward_blocks.wgsl,
// cpu/layer_norm/backward_blocks.wgsl): a workgroup of BLOCK invocations takes a block of BLOCK
// rows, and invocation `lid` takes the column quads lid, lid + BLOCK, … (its slots), TILE at a
// time while every invocation has TILE left, then one at a time. The includer declares the
// uniform `p` (width, row_base and the dropout's fields) and `const VEC4`.

// #include "lib/philox.wgsl"
// #include "layer_norm/rows.wgsl"

const BLOCK: u32 = 64u;
const TILE: u32 = 3u;

// (full tiles of TILE, slots in all) of an invocation.
fn tile_counts() -> vec2<u32> {
    let quads = (p.width + 3u) / 4u;
    return vec2<u32>(quads / BLOCK / TILE, (quads + BLOCK - 1u) / BLOCK);
}

// First column of slot s of invocation `lid`.
fn slot_column(lid: u32, s: u32) -> u32 {
    return 4u * (lid + BLOCK * s);
}

// First columns of slots s0, s0 + 1, s0 + 2 (the last two past the row outside full tiles).
fn tile_columns(lid: u32, s0: u32) -> vec3<u32> {
    return vec3<u32>(slot_column(lid, s0), slot_column(lid, s0 + 1u), slot_column(lid, s0 + 2u));
}

// Mask factors of the row-block paths' column tile at columns j (multiples of 4) of `row`
// (local to the dispatch) in the vec4 variant, where rows start on quads: the three quads'
// from three interleaved Philox calls, or j.x's alone (the others ones) unless `tile`. Ones
// without `drop` (a literal at every call) and in the scalar variant, whose quads may span two
// Philox groups and draw their own (drop_span).
fn tile_masks(state: vec4<u32>, row: u32, j: vec3<u32>, tile: bool, drop: bool) -> Factors3 {
    let ones = vec4<f32>(1.0);
    if (!VEC4 || !drop) {
        return Factors3(ones, ones, ones);
    }
    let q = (vec3<u32>((p.row_base + row) * p.width) + j) >> vec3<u32>(2u);
    if (tile) {
        return dropout_factors4x3(state, q, p.drop_threshold, p.drop_flags, p.drop_scale);
    }
    return Factors3(drop4(state, q.x), ones, ones);
}

