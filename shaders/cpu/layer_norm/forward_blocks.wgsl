// LayerNorm forward on the row-block path, for CPU adapters (`lanes` = 1): the same results as
// layer_norm/forward.wgsl's lane path (same uniform, bindings, mask and statistics around K)
// within rounding.
//
//   layer_norm_block_forward                   y = LN(x); with DROPOUT, y ← y·m
//   layer_norm_block_residual_dropout_forward  h = residual + x·m written out, y = LN(h)
//
// A workgroup of BLOCK invocations takes a block of BLOCK rows. One invocation per row reduces
// its row (the arithmetic, in the same order, of the lane path with one lane per row) and leaves (K, mean − K, rstd) in workgroup
// memory; then each invocation normalizes its column quads down the block's rows from the
// core's cache with their γ and β in registers, read once per column instead of once per row
// (on a CPU driver their per-row vector loads cost about a quarter of `layer_norm_forward`), in tiles of
// three column quads that share each row's statistics (below).

// #include "layer_norm/forward_common.wgsl"
// #include "cpu/layer_norm/columns.wgsl"
// #vec4-variant

var<workgroup> block_stats: array<vec3<f32>, BLOCK>;

@compute @workgroup_size(64)
fn layer_norm_block_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let block = wid.x + wid.y * nwg.x;
    block_row_stats(block, lid);
    workgroupBarrier();
    block_normalize(block, lid, DROPOUT);
}

// The residual block: the row phase writes h; the column phase reads it back (other
// invocations' writes, hence the storage barrier).
@compute @workgroup_size(64)
fn layer_norm_block_residual_dropout_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let block = wid.x + wid.y * nwg.x;
    block_residual_row(block, lid);
    workgroupBarrier();
    storageBarrier();
    block_normalize_h(block, lid);
}

// Saves the row's mean and rstd from its triple of values shifted by K, and keeps
// (K, mean − K, rstd) for the column phase.
fn block_finish(lid: u32, row: u32, shift: f32, acc: Stat) {
    let st = row_norm(acc);
    mean_out[p.row_base + row] = shift + acc.mean;
    rstd_out[p.row_base + row] = st.y;
    block_stats[lid] = vec3<f32>(shift, st.x, st.y);
}

// Row phase of the plain and dropout passes: row block·BLOCK + lid.
fn block_row_stats(block: u32, lid: u32) {
    let row = block * BLOCK + lid;
    if (row >= p.rows) {
        return;
    }
    let r = row_of(Slot(row, 0u, true));
    let shift = row_shift(ld_x(r.base));
    block_finish(lid, row, shift, lane_stat(r, shift, 0u, 1u, true));
}

// Row phase of the residual block: h = residual + x·m written out, statistics around the
// row's first residual value.
fn block_residual_row(block: u32, lid: u32) {
    let row = block * BLOCK + lid;
    if (row >= p.rows) {
        return;
    }
    let r = row_of(Slot(row, 0u, true));
    let shift = row_shift(ld_residual(r.base));
    block_finish(lid, row, shift, lane_residual_stat(r, shift, load_state(), 0u, 1u, true));
}

// γ (ones without weight) and β (zeros without bias) of columns j0 .. j0 + 3, those inside the
// row; affine4 with these is affine's arithmetic.
struct ColumnParams {
    gamma: vec4<f32>,
    beta: vec4<f32>,
}

fn column_params(j0: u32) -> ColumnParams {
    var c = ColumnParams(vec4<f32>(1.0), vec4<f32>(0.0));
    if (j0 >= p.width) {
        return c;
    }
    if (VEC4) {
        if ((p.flags & FLAG_WEIGHT) != 0u) {
            c.gamma = ld4a_weight(j0);
        }
        if ((p.flags & FLAG_BIAS) != 0u) {
            c.beta = ld4a_bias(j0);
        }
        return c;
    }
    for (var t = 0u; t < 4u; t++) {
        if (j0 + t < p.width) {
            if ((p.flags & FLAG_WEIGHT) != 0u) {
                c.gamma[t] = ld_weight(j0 + t);
            }
            if ((p.flags & FLAG_BIAS) != 0u) {
                c.beta[t] = ld_bias(j0 + t);
            }
        }
    }
    return c;
}

// Column tiles. Invocation `lid` takes the column quads lid, lid + BLOCK, lid + 2·BLOCK, … (its
// slots 0, 1, 2, …). While every invocation has three slots left, it takes three at a time:
// their γ and β in registers and each row's statistics read from workgroup memory once for the
// three (a CPU driver loads workgroup memory lane by lane, and those loads were a tenth of
// `layer_norm_forward`). The rest go one slot at a time, the last of which may lie past the row for some
// invocations. The three slots are spelled out, not looped over arrays, so that no driver
// needs to unroll a loop to keep them in registers (TILE, tile_counts,
// tile_columns: cpu/layer_norm/columns.wgsl).

// Column phase: every slot of invocation `lid` down the block's rows; y ← y·m with `drop`.
// `tile` (a constant) takes slots s0 .. s0 + 2, else slot s0 alone. The residual block's twin,
// block_normalize_h, reads h instead of x: an entry point's layout holds every binding its call
// graph names, so the two walks stay separate functions.
fn block_normalize(block: u32, lid: u32, drop: bool) {
    var state = vec4<u32>(0u);
    if (drop) {
        state = load_state();
    }
    let counts = tile_counts();
    for (var s = 0u; s < counts.x; s++) {
        normalize_tile(block, lid, s * TILE, true, state, drop);
    }
    for (var s = counts.x * TILE; s < counts.y; s++) {
        normalize_tile(block, lid, s, false, state, drop);
    }
}

fn normalize_tile(block: u32, lid: u32, s0: u32, tile: bool, state: vec4<u32>, drop: bool) {
    let j = tile_columns(lid, s0);
    let a = column_params(j.x);
    var b = a;
    var c = a;
    if (tile) {
        b = column_params(j.y);
        c = column_params(j.z);
    }
    let first = block * BLOCK;
    for (var row = first; row < min(first + BLOCK, p.rows); row++) {
        let st = block_stats[row - first];
        let m = tile_masks(state, row, j, tile, drop);
        normalize_step(row, j.x, st, a, m.a, state, drop);
        if (tile) {
            normalize_step(row, j.y, st, b, m.b, state, drop);
            normalize_step(row, j.z, st, c, m.c, state, drop);
        }
    }
}

// y of column quad j0 (nothing past the row) of `row`, whose statistics are
// st = (K, mean − K, rstd), under the columns' γ and β; with `drop`, times the mask: `m` in the
// vec4 variant (the caller's draw), drawn here otherwise (a quad may span two Philox groups).
fn normalize_step(row: u32, j0: u32, st: vec3<f32>, c: ColumnParams, m: vec4<f32>, state: vec4<u32>, drop: bool) {
    if (j0 >= p.width) {
        return;
    }
    let e = row * p.width + j0;
    if (VEC4) {
        st4_y(e, quad_y(ld4a_x(e), st, c) * m, e + 4u);
        return;
    }
    var ms = vec4<f32>(1.0);
    if (drop) {
        ms = drop_span(state, p.row_base * p.width + e);
    }
    for (var u = 0u; u < 4u; u++) {
        if (j0 + u < p.width) {
            st_y(e + u, element_y(ld_x(e + u), st, c, u) * ms[u]);
        }
    }
}

fn block_normalize_h(block: u32, lid: u32) {
    let counts = tile_counts();
    for (var s = 0u; s < counts.x; s++) {
        normalize_tile_h(block, lid, s * TILE, true);
    }
    for (var s = counts.x * TILE; s < counts.y; s++) {
        normalize_tile_h(block, lid, s, false);
    }
}

fn normalize_tile_h(block: u32, lid: u32, s0: u32, tile: bool) {
    let j = tile_columns(lid, s0);
    let a = column_params(j.x);
    var b = a;
    var c = a;
    if (tile) {
        b = column_params(j.y);
        c = column_params(j.z);
    }
    let first = block * BLOCK;
    for (var row = first; row < min(first + BLOCK, p.rows); row++) {
        let st = block_stats[row - first];
        normalize_step_h(row, j.x, st, a);
        if (tile) {
            normalize_step_h(row, j.y, st, b);
            normalize_step_h(row, j.z, st, c);
        }
    }
}

// normalize_step of the residual block's h (no mask: it is in h already).
fn normalize_step_h(row: u32, j0: u32, st: vec3<f32>, c: ColumnParams) {
    if (j0 >= p.width) {
        return;
    }
    let e = row * p.width + j0;
    if (VEC4) {
        st4_y(e, quad_y(ld4a_h(e), st, c), e + 4u);
        return;
    }
    for (var u = 0u; u < 4u; u++) {
        if (j0 + u < p.width) {
            st_y(e + u, element_y(ld_h(e + u), st, c, u));
        }
    }
}

// y of input values v of a row with statistics st = (K, mean − K, rstd), under γ and β c.
fn quad_y(v: vec4<f32>, st: vec3<f32>, c: ColumnParams) -> vec4<f32> {
    return ((v - st.x) - st.y) * st.z * c.gamma + c.beta;
}

// quad_y of one value, the column's u-th of the quad.
fn element_y(v: f32, st: vec3<f32>, c: ColumnParams, u: u32) -> f32 {
    return ((v - st.x) - st.y) * st.z * c.gamma[u] + c.beta[u];
}
