// LayerNorm backward on the row-block path, for CPU adapters (`lanes` = 1): the dx pass and the
// dγ/dβ partials of layer_norm/backward.wgsl in one pass per 64-row block, with its uniform,
// bindings, mask and partials layout (layer_norm_backward_params_final sums them as it sums the
// partial pass's).
//
//   layer_norm_backward_gamma_stage        before the block pass: γ into its uniform copy
//   layer_norm_backward_block_dx           by DROPOUT and ACCUMULATE, as layer_norm_backward_dx
//   layer_norm_backward_block_residual_dx  the residual block's, by ACCUMULATE
//
// A workgroup of BLOCK invocations
// takes a block of BLOCK rows, the partial pass's block, and does the dx pass and the dγ/dβ
// partials itself. First one invocation per row sums its row; the row coefficients go to
// workgroup memory. Then each invocation walks its column quads (up to three at a time, in
// tiles below) down the block's rows (the same bytes, now in the core's cache), writes dx and
// sums the columns' dγ, dβ partials, reading γ once per column instead of once per element. x and dy are read from memory once and dx
// written once, the minimum; the mask is drawn once per element unless accumulating with
// LayerNorm → dropout.

// #include "layer_norm/backward_common.wgsl"
// #include "cpu/layer_norm/columns.wgsl"
// #vec4-variant

// The uniform copy's writable view, for layer_norm_backward_gamma_stage.
@group(0) @binding(14) var<storage, read_write> gamma_stage: array<f32>;

// Copies γ of the first 4·GAMMA_QUADS columns into the uniform copy (run only with γ); one
// invocation per column.
@compute @workgroup_size(256)
fn layer_norm_backward_gamma_stage(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x < min(p.width, 4u * GAMMA_QUADS)) {
        gamma_stage[gid.x] = ld_weight(gid.x);
    }
}

// Per row of the block: (K, mean − K, rstd, mean(g)) and mean(g·x̂), the coefficients of dh_of.
var<workgroup> block_coef: array<vec4<f32>, BLOCK>;
var<workgroup> block_slope: array<f32, BLOCK>;

// The row-block passes, by DROPOUT and ACCUMULATE as the dx pass, and the residual block's (by
// ACCUMULATE). One workgroup per block of BLOCK rows.
@compute @workgroup_size(64)
fn layer_norm_backward_block_dx(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let block = wid.x + wid.y * nwg.x;
    block_columns(block, lid, block_begin(block, lid, DROPOUT, false, ACCUMULATE), DROPOUT, ACCUMULATE);
}

@compute @workgroup_size(64)
fn layer_norm_backward_block_residual_dx(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let block = wid.x + wid.y * nwg.x;
    block_columns_residual(block, lid, block_begin(block, lid, false, true, ACCUMULATE), ACCUMULATE);
}

// The row phase of block `block`, then a barrier; returns the generator state (zeros unless
// `drop`, LayerNorm → dropout with dy ← dy·m, or `residual`, the residual block's mask on dx).
fn block_begin(block: u32, lid: u32, drop: bool, residual: bool, accumulate: bool) -> vec4<u32> {
    var state = vec4<u32>(0u);
    if (drop || residual) {
        state = load_state();
    }
    let park = parks(drop, accumulate);
    block_row(block * BLOCK + lid, lid, state, drop, park);
    workgroupBarrier();
    if (park) {
        // The column phase reads dx that other invocations wrote.
        storageBarrier();
    }
    return state;
}

// In the vec4 variant, writing with LayerNorm → dropout, the row phase parks dy·m in dx (its
// own row) for the column phase; otherwise the column phase reads dy and draws the mask again.
fn parks(drop: bool, accumulate: bool) -> bool {
    return VEC4 && drop && !accumulate;
}

// Row phase: row `row` (local to the dispatch) of the block, one invocation.
fn block_row(row: u32, lid: u32, state: vec4<u32>, drop: bool, park: bool) {
    if (row >= p.rows) {
        return;
    }
    let r = row_of(Slot(row, 0u, true));
    let shift = row_shift(ld_x(r.base));
    let rs = rstd[p.row_base + row];
    // γ from the uniform copy for the first GAMMA_QUADS quads (every quad of rows up to
    // 4·GAMMA_QUADS wide), from `weight` for the rest.
    let staged = min(r.quads, GAMMA_QUADS);
    var sums = vec3<f32>(0.0);
    if (VEC4) {
        // With the mask, three quads at a time: three interleaved Philox calls.
        var k = 0u;
        if (drop) {
            for (; k + 3u <= staged; k += 3u) {
                let q = vec3<u32>(r.q0 + k, r.q0 + k + 1u, r.q0 + k + 2u);
                let m = dropout_factors4x3(state, q, p.drop_threshold, p.drop_flags, p.drop_scale);
                sums += row_quad(r, k, shift, m.a, park, true);
                sums += row_quad(r, k + 1u, shift, m.b, park, true);
                sums += row_quad(r, k + 2u, shift, m.c, park, true);
            }
        }
        for (; k < staged; k++) {
            sums += row_quad(r, k, shift, quad_factors(state, r, k, drop), park, true);
        }
        // Rows wider than the copy: one quad at a time (for narrower rows an empty loop,
        // whose body a CPU driver still runs once, masked).
        for (; k < r.quads; k++) {
            sums += row_quad(r, k, shift, quad_factors(state, r, k, drop), park, false);
        }
    } else {
        sums = lane_sums(state, r, shift, 0u, staged, 1u, true, drop, true)
            + lane_sums(state, r, shift, staged, r.quads, 1u, true, drop, false);
    }
    let cf = coefficients_of(sums, rs);
    block_coef[lid] = vec4<f32>(shift, cf.x, rs, cf.y);
    block_slope[lid] = cf.z;
}

// quad_sums of the row's quad k (vec4 variant), its dy times the mask factors m; with `park`,
// dy·m is written to dx for the column phase. γ from the uniform copy when `staged` (k <
// GAMMA_QUADS).
fn row_quad(r: Row, k: u32, shift: f32, m: vec4<f32>, park: bool, staged: bool) -> vec3<f32> {
    let e = r.base + 4u * k;
    let d = ld4a_dy(e) * m;
    if (park) {
        st4_dx(e, d, e + 4u);
    }
    var gam: vec4<f32>;
    if (staged) {
        gam = gamma_u[k];
    } else {
        gam = gamma4(4u * k);
    }
    return quad_sums(ld4a_x(e) - shift, d * gam);
}

// (x̂, dh) of quad x of a block row with coefficients c = (K, mean − K, rstd, mean(g)) and
// slope mean(g·x̂), d = dy·m its upstream gradient, gam its γ; dh as dh_of, with g = d·γ formed
// as in the row phase, so g − mean(g) cancels as there.
struct BlockQuad {
    xhat: vec4<f32>,
    dh: vec4<f32>,
}

fn block_quad(c: vec4<f32>, slope: f32, x: vec4<f32>, d: vec4<f32>, gam: vec4<f32>) -> BlockQuad {
    let xhat = ((x - c.x) - c.y) * c.z;
    return BlockQuad(xhat, c.z * (d * gam - c.w - xhat * slope));
}

// block_quad of one element: (x̂, dh).
fn block_element(c: vec4<f32>, slope: f32, x: f32, d: f32, gam: f32) -> vec2<f32> {
    let xhat = ((x - c.x) - c.y) * c.z;
    return vec2<f32>(xhat, c.z * (d * gam - c.w - xhat * slope));
}

// Column tiles, as layer_norm/forward.wgsl's forward: invocation `lid` takes the column quads lid,
// lid + BLOCK, … (its slots), three at a time while every invocation has three left (γ and the
// dγ, dβ sums of each in registers, each row's coefficients read from workgroup memory once for
// the three: on a CPU driver those lane-by-lane loads were a tenth of `layer_norm_backward`), then one at a
// time. The three slots are spelled out rather than looped over arrays: a CPU driver that
// does not unroll such a loop indexes the sums in memory (the residual block's backward took
// 1.5× as long). TILE, tile_counts, tile_columns: layer_norm/rows.wgsl.

// γ of columns j0 .. j0 + 3 (ones past the row).
fn column_gamma(j0: u32) -> vec4<f32> {
    if (VEC4) {
        if (j0 < p.width) {
            return gamma4(j0);
        }
        return vec4<f32>(1.0);
    }
    var gam = vec4<f32>(1.0);
    for (var u = 0u; u < 4u; u++) {
        if (j0 + u < p.width) {
            gam[u] = gamma(j0 + u);
        }
    }
    return gam;
}

// A column quad's running (Σd·x̂, Σd) down the block's rows, and its γ.
struct ColumnSums {
    gx: vec4<f32>,
    gs: vec4<f32>,
    gam: vec4<f32>,
}

fn column_start(j0: u32) -> ColumnSums {
    return ColumnSums(vec4<f32>(0.0), vec4<f32>(0.0), column_gamma(j0));
}

// The block's partial (Σd·x̂, Σd) of columns j0 .. j0 + 3 (those inside the row).
fn block_partials(block: u32, j0: u32, sums: ColumnSums) {
    for (var t = 0u; t < 4u; t++) {
        if (j0 + t < p.width) {
            partials[(p.block_base + block) * p.width + j0 + t] = vec2<f32>(sums.gx[t], sums.gs[t]);
        }
    }
}

// Column phase: every slot of invocation `lid` down the block's rows; writes dx and the block's
// dγ, dβ partials. `tile` (a constant) takes slots s0 .. s0 + 2, else slot s0 alone.
fn block_columns(block: u32, lid: u32, state: vec4<u32>, drop: bool, accumulate: bool) {
    let counts = tile_counts();
    for (var s = 0u; s < counts.x; s++) {
        columns_tile(block, lid, s * TILE, true, state, drop, accumulate);
    }
    for (var s = counts.x * TILE; s < counts.y; s++) {
        columns_tile(block, lid, s, false, state, drop, accumulate);
    }
}

fn columns_tile(block: u32, lid: u32, s0: u32, tile: bool, state: vec4<u32>, drop: bool, accumulate: bool) {
    let j = tile_columns(lid, s0);
    var a = column_start(j.x);
    var b = a;
    var c = a;
    if (tile) {
        b = column_start(j.y);
        c = column_start(j.z);
    }
    let first = block * BLOCK;
    for (var row = first; row < min(first + BLOCK, p.rows); row++) {
        let cf = block_coef[row - first];
        let slope = block_slope[row - first];
        a = column_step(a, row, j.x, cf, slope, state, drop, accumulate);
        if (tile) {
            b = column_step(b, row, j.y, cf, slope, state, drop, accumulate);
            c = column_step(c, row, j.z, cf, slope, state, drop, accumulate);
        }
    }
    tile_partials(block, j, tile, a, b, c);
}

// The partials of a tile's slots (of slot j.x alone unless `tile`).
fn tile_partials(block: u32, j: vec3<u32>, tile: bool, a: ColumnSums, b: ColumnSums, c: ColumnSums) {
    if (j.x < p.width) {
        block_partials(block, j.x, a);
    }
    if (tile) {
        block_partials(block, j.y, b);
        block_partials(block, j.z, c);
    }
}

// One row of column quad j0 (nothing past the row): dx written, the column's sums advanced.
fn column_step(
    sums: ColumnSums, row: u32, j0: u32, cf: vec4<f32>, slope: f32, state: vec4<u32>, drop: bool, accumulate: bool,
) -> ColumnSums {
    var out = sums;
    if (j0 >= p.width) {
        return out;
    }
    let park = parks(drop, accumulate);
    let e = row * p.width + j0;
    if (VEC4) {
        // Rows of whole quads: columns j0 .. j0 + 3 of a row are one aligned quad.
        var d: vec4<f32>;
        if (park) {
            d = ld4a_dx(e);
        } else {
            d = ld4a_dy(e);
            if (drop) {
                d *= drop4(state, (p.row_base * p.width + e) >> 2u);
            }
        }
        let q = block_quad(cf, slope, ld4a_x(e), d, sums.gam);
        if (accumulate) {
            st4_dx(e, ld4a_dx(e) + q.dh, e + 4u);
        } else {
            st4_dx(e, q.dh, e + 4u);
        }
        out.gx += d * q.xhat;
        out.gs += d;
        return out;
    }
    var m = vec4<f32>(1.0);
    if (drop) {
        m = drop_span(state, p.row_base * p.width + e);
    }
    for (var u = 0u; u < 4u; u++) {
        if (j0 + u < p.width) {
            let d = ld_dy(e + u) * m[u];
            let q = block_element(cf, slope, ld_x(e + u), d, sums.gam[u]);
            emit(e + u, q.y);
            out.gx[u] += d * q.x;
            out.gs[u] += d;
        }
    }
    return out;
}

// block_columns of the residual block: dy unmasked; dx = dh·m and dresidual = dh. A separate
// walk, since an entry point's layout holds every binding its call graph names.
fn block_columns_residual(block: u32, lid: u32, state: vec4<u32>, accumulate: bool) {
    let counts = tile_counts();
    for (var s = 0u; s < counts.x; s++) {
        columns_tile_residual(block, lid, s * TILE, true, state, accumulate);
    }
    for (var s = counts.x * TILE; s < counts.y; s++) {
        columns_tile_residual(block, lid, s, false, state, accumulate);
    }
}

fn columns_tile_residual(block: u32, lid: u32, s0: u32, tile: bool, state: vec4<u32>, accumulate: bool) {
    let j = tile_columns(lid, s0);
    var a = column_start(j.x);
    var b = a;
    var c = a;
    if (tile) {
        b = column_start(j.y);
        c = column_start(j.z);
    }
    let first = block * BLOCK;
    for (var row = first; row < min(first + BLOCK, p.rows); row++) {
        let cf = block_coef[row - first];
        let slope = block_slope[row - first];
        let m = tile_masks(state, row, j, tile, true);
        a = residual_step(a, row, j.x, cf, slope, m.a, state, accumulate);
        if (tile) {
            b = residual_step(b, row, j.y, cf, slope, m.b, state, accumulate);
            c = residual_step(c, row, j.z, cf, slope, m.c, state, accumulate);
        }
    }
    tile_partials(block, j, tile, a, b, c);
}

// column_step of the residual block; `m` is the vec4 variant's mask factors (the caller's draw),
// drawn here otherwise (a quad may span two Philox groups).
fn residual_step(
    sums: ColumnSums, row: u32, j0: u32, cf: vec4<f32>, slope: f32, m: vec4<f32>, state: vec4<u32>, accumulate: bool,
) -> ColumnSums {
    var out = sums;
    if (j0 >= p.width) {
        return out;
    }
    let e = row * p.width + j0;
    if (VEC4) {
        let d = ld4a_dy(e);
        let q = block_quad(cf, slope, ld4a_x(e), d, sums.gam);
        residual_emit4(e, q.dh, m, accumulate);
        out.gx += d * q.xhat;
        out.gs += d;
        return out;
    }
    let ms = drop_span(state, p.row_base * p.width + e);
    for (var u = 0u; u < 4u; u++) {
        if (j0 + u < p.width) {
            let d = ld_dy(e + u);
            let q = block_element(cf, slope, ld_x(e + u), d, sums.gam[u]);
            residual_emit(e + u, q.y, ms[u]);
            out.gx[u] += d * q.x;
            out.gs[u] += d;
        }
    }
    return out;
}
