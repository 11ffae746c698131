// LayerNorm over the trailing `width` = ∏ normalized_shape elements of each row, optionally
// fused with dropout (mask spec in lib/philox.wgsl; element index = flat index row·width + j):
//
//   mean_r = (1/W) Σ_j h[r,j]            var_r = (1/W) Σ_j (h[r,j] − mean_r)²   (biased)
//   rstd_r = 1 / sqrt(var_r + eps)       y[r,j] = (h[r,j] − mean_r)·rstd_r·γ_j + β_j
//
//   layer_norm_forward                   h = x; with DROPOUT, then y ← y·m  (LayerNorm, then dropout)
//   layer_norm_residual_dropout_forward  h = residual + x·m, written out; y = LN(h)   (pre-norm block)
//   m = drop_scale if kept else 0 (train), drop_scale with every element kept (eval).
//
// Geometry: a row gets `lanes` invocations, a power of two in 1..=256 the host picks
// (`default_lanes`): on GPUs the smallest in 8..=256 with lanes·16 >= width (256 past that); on
// CPU adapters as few as still keep every thread busy, down to a row per invocation. A
// workgroup of 256 runs 256/lanes rows side by side, each reduced within its own lane segment,
// so narrow rows do not pay a whole workgroup each. Workgroups fold into y.
//   width <= 16·lanes: the row is read once into registers (up to 16 per lane, strided by
//                  `lanes` so loads coalesce). Each lane forms its exact local (count, mean, M2)
//                  by two passes over its registers; the segment Chan-merges them. Traffic:
//                  read x once, write y once.
//   wider rows:    Welford per lane over a strided slice, Chan merge, then a second read to
//                  normalize (the residual variant re-reads the h it wrote). In the vec4
//                  variant (f32, W % 4 == 0, chosen by the host) a lane's quads are vector
//                  loads and stores and each quad enters Welford as one exact triple.
//   lanes = 1:     the row-block path (ln_block_*, workgroups of BLOCK = 64): one invocation
//                  per row reduces it, then each invocation normalizes its column quads (up
//                  to three at a time) down the block's rows (see the end of this file).
// Binding ranges: a tensor larger than one storage binding is processed in row ranges; the
// activations are bound at the range's offset (indices here are local to it), mean and rstd are
// bound whole and indexed by the global row p.row_base + row, and the dropout's element index
// is global, so the mask is the single-binding one.
// Precision: activations stored as the variant says (f32, f16 or packed f16); f32 arithmetic;
// the variance is never E[x²] − E[x]². Statistics are taken around K, a value from the row
// itself (x[r, 0], or residual[r, 0] for the residual block), and rows are normalized as ((h − K) − (mean − K))·rstd, so off-centre rows
// (1000 + 0.1·randn) keep the precision of their spread.

// #include "lib/welford.wgsl"
// #include "lib/philox.wgsl"
// #include "layer_norm/rows.wgsl"
// #include "layer_norm/forward_params.wgsl"
// #vec4-variant

const WG: u32 = 256u;
const REGS: u32 = 16u;

// Set per pipeline (a pipeline-overridable constant): the driver compiles it as a constant and
// drops the untaken side, which a CPU driver would otherwise execute under a lane mask.
override DROPOUT: bool = false;  // y ← y·m, the fused dropout's mask (layer_norm_forward, layer_norm_block_forward)

const FLAG_WEIGHT: u32 = 1u;     // multiply by γ
const FLAG_BIAS: u32 = 2u;       // add β

// The uniform's layout: layer_norm/forward_params.wgsl.

@group(0) @binding(0) var<uniform> p: Params;
// #activation @binding(1) read x (rows, W)
// #activation @binding(2) read_write y (rows, W)
// #param @binding(3) weight (W) γ
// #param @binding(4) bias (W) β
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;  // (rows)
@group(0) @binding(6) var<storage, read_write> rstd_out: array<f32>;  // (rows)
@group(0) @binding(7) var<storage, read> rng_state: vec4<u32>;       // (seed lo, seed hi, offset lo, offset hi)
// #activation @binding(8) read residual (rows, W)
// #activation @binding(9) read_write h (rows, W) residual + dropout(x)

// γ and β of column j applied to a normalized value.
fn affine(j: u32, v: f32) -> f32 {
    var r = v;
    if ((p.flags & FLAG_WEIGHT) != 0u) {
        r = r * ld_weight(j);
    }
    if ((p.flags & FLAG_BIAS) != 0u) {
        r = r + ld_bias(j);
    }
    return r;
}

// affine of columns j .. j + 3.
fn affine4(j: u32, v: vec4<f32>) -> vec4<f32> {
    var r = v;
    if ((p.flags & FLAG_WEIGHT) != 0u) {
        r = r * ld4a_weight(j);
    }
    if ((p.flags & FLAG_BIAS) != 0u) {
        r = r + ld4a_bias(j);
    }
    return r;
}

// Chan-merges the triples of one row's lane segment; every lane gets the row's total, in the
// same merge order. Two barriers whatever the segment's width: the segment's first lane of
// every group of SEG_FOLD folds its group, then every lane folds the group partials itself.
// (A tree would take log2(lanes) + 2 barriers; on CPU drivers each barrier switches between all
// of the workgroup's fibers, which cost more than the arithmetic.) Called once per dispatch:
// a second call would need a barrier first, so no lane overwrites a partial still being read.
fn segment_merge(lid: u32, lane: u32, mine: Stat) -> Stat {
    shared_stat[lid] = mine;
    workgroupBarrier();
    let fold = min(p.lanes, SEG_FOLD);
    if ((lane & (fold - 1u)) == 0u) {
        var acc = mine;
        for (var k = 1u; k < fold; k++) {
            acc = chan_merge(acc, shared_stat[lid + k]);
        }
        shared_stat[lid] = acc;
    }
    workgroupBarrier();
    let first = lid - lane;
    var total = shared_stat[first];
    for (var g = fold; g < p.lanes; g += fold) {
        total = chan_merge(total, shared_stat[first + g]);
    }
    return total;
}

// The row's (mean − K, rstd) from shifted values v = h − K in registers (slot 4i + t: element t
// of the lane's i-th quad): exact local two-pass per lane, Chan merge across the row's lanes.
fn stats_from_registers(lid: u32, at: Slot, r: Row, shift: f32, v: ptr<function, array<f32, REGS>>) -> vec2<f32> {
    var n = 0.0;
    var sum = 0.0;
    for (var i = 0u; i < REGS / 4u; i++) {
        for (var t = 0u; t < 4u; t++) {
            let k = at.lane + i * p.lanes;
            if (at.live && k < r.quads && column(r, k, t) < p.width) {
                n += 1.0;
                sum += (*v)[4u * i + t];
            }
        }
    }
    let local_mean = select(0.0, sum / n, n > 0.0);
    var m2 = 0.0;
    for (var i = 0u; i < REGS / 4u; i++) {
        for (var t = 0u; t < 4u; t++) {
            let k = at.lane + i * p.lanes;
            if (at.live && k < r.quads && column(r, k, t) < p.width) {
                let d = (*v)[4u * i + t] - local_mean;
                m2 += d * d;
            }
        }
    }
    return finish_stats(lid, at, shift, Stat(n, local_mean, m2));
}

// Merges the lanes' triples of shifted values into the row's (mean − K, rstd); lane 0 saves
// mean = K + (mean − K) and rstd.
fn finish_stats(lid: u32, at: Slot, shift: f32, mine: Stat) -> vec2<f32> {
    let total = segment_merge(lid, at.lane, mine);
    let rstd = 1.0 / sqrt(max(total.m2 / f32(p.width), 0.0) + p.eps);
    if (at.lane == 0u && at.live) {
        mean_out[p.row_base + at.row] = shift + total.mean;
        rstd_out[p.row_base + at.row] = rstd;
    }
    return vec2<f32>(total.mean, rstd);
}

@compute @workgroup_size(256)
fn layer_norm_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    forward(slot_of(wid, nwg, lid), lid, DROPOUT);
}

// Welford triple of x − K over the row's quads first, first + stride, … (none unless `live`):
// in the vec4 variant a quad's exact triple per step, else one value per step.
fn lane_stat(r: Row, shift: f32, first: u32, stride: u32, live: bool) -> Stat {
    var acc = Stat(0.0, 0.0, 0.0);
    for (var k = first; live && k < r.quads; k += stride) {
        if (VEC4) {
            acc = chan_merge(acc, quad_stat(ld4a_x(r.base + 4u * k) - shift));
        } else {
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (j < p.width) {
                    acc = welford_add(acc, ld_x(r.base + j) - shift);
                }
            }
        }
    }
    return acc;
}

// The residual block's h = residual + x·m over the row's quads first, first + stride, … (none
// unless `live`), written out; returns the Welford triple of h − K (rounded to the storage
// type first, so that it is the h read back later).
fn lane_residual_stat(r: Row, shift: f32, state: vec4<u32>, first: u32, stride: u32, live: bool) -> Stat {
    var acc = Stat(0.0, 0.0, 0.0);
    for (var k = first; live && k < r.quads; k += stride) {
        let m = drop4(state, r.q0 + k);
        if (VEC4) {
            let e = r.base + 4u * k;
            let hv = ld4a_residual(e) + ld4a_x(e) * m;
            st4_h(e, hv, e + 4u);
            acc = chan_merge(acc, quad_stat(hv - shift));
        } else {
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (j < p.width) {
                    let e = r.base + j;
                    let hv = to_storage(ld_residual(e) + ld_x(e) * m[t]);
                    st_h(e, hv);
                    acc = welford_add(acc, hv - shift);
                }
            }
        }
    }
    return acc;
}

// y = LN(x), then y ← y·m when `drop` (a literal at both calls, so each entry point holds only
// its own path: a CPU driver runs both sides of a branch under a lane mask).
fn forward(at: Slot, lid: u32, drop: bool) {
    let r = row_of(at);
    // Statistics are taken around the row's first value K.
    var shift = 0.0;
    if (at.live) {
        shift = ld_x(r.base);
    }
    var state = vec4<u32>(0u);
    if (drop) {
        state = load_state();
    }
    if (in_registers()) {
        // Load the row once, reduce from registers, normalize from registers.
        var v: array<f32, REGS>;
        for (var i = 0u; i < REGS / 4u; i++) {
            let k = at.lane + i * p.lanes;
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (at.live && k < r.quads && j < p.width) {
                    v[4u * i + t] = ld_x(r.base + j) - shift;
                }
            }
        }
        let st = stats_from_registers(lid, at, r, shift, &v);
        for (var i = 0u; i < REGS / 4u; i++) {
            let k = at.lane + i * p.lanes;
            let m = quad_factors(state, r, k, drop);
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (at.live && k < r.quads && j < p.width) {
                    st_y(r.base + j, affine(j, (v[4u * i + t] - st.x) * st.y) * m[t]);
                }
            }
        }
    } else if (VEC4) {
        // Rows of whole quads (the host binds this variant only when W % 4 == 0): vector loads
        // and stores, a quad's exact triple per Welford step.
        let st = finish_stats(lid, at, shift, lane_stat(r, shift, at.lane, p.lanes, at.live));
        for (var k = at.lane; at.live && k < r.quads; k += p.lanes) {
            let m = quad_factors(state, r, k, drop);
            let e = r.base + 4u * k;
            st4_y(e, affine4(4u * k, ((ld4a_x(e) - shift) - st.x) * st.y) * m, e + 4u);
        }
    } else {
        // Wide row: Welford pass, then a second read to normalize.
        let st = finish_stats(lid, at, shift, lane_stat(r, shift, at.lane, p.lanes, at.live));
        for (var k = at.lane; at.live && k < r.quads; k += p.lanes) {
            let m = quad_factors(state, r, k, drop);
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (j < p.width) {
                    st_y(r.base + j, affine(j, ((ld_x(r.base + j) - shift) - st.x) * st.y) * m[t]);
                }
            }
        }
    }
}

// Pre-norm residual block: h = residual + x·m written out, y = LN(h). Statistics are taken
// around the row's first residual value (h is not formed yet).
@compute @workgroup_size(256)
fn layer_norm_residual_dropout_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let at = slot_of(wid, nwg, lid);
    let r = row_of(at);
    var shift = 0.0;
    if (at.live) {
        shift = ld_residual(r.base);
    }
    let state = load_state();
    if (in_registers()) {
        // h out to memory and, shifted, into registers; then LN(h).
        var v: array<f32, REGS>;
        for (var i = 0u; i < REGS / 4u; i++) {
            let k = at.lane + i * p.lanes;
            let m = drop4(state, r.q0 + k);
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (at.live && k < r.quads && j < p.width) {
                    let e = r.base + j;
                    let hv = to_storage(ld_residual(e) + ld_x(e) * m[t]);
                    st_h(e, hv);
                    v[4u * i + t] = hv - shift;
                }
            }
        }
        let st = stats_from_registers(lid, at, r, shift, &v);
        for (var i = 0u; i < REGS / 4u; i++) {
            let k = at.lane + i * p.lanes;
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (at.live && k < r.quads && j < p.width) {
                    st_y(r.base + j, affine(j, (v[4u * i + t] - st.x) * st.y));
                }
            }
        }
    } else if (VEC4) {
        // Rows of whole quads, as in `forward`. Each lane re-reads only the h it wrote.
        let st = finish_stats(lid, at, shift, lane_residual_stat(r, shift, state, at.lane, p.lanes, at.live));
        for (var k = at.lane; at.live && k < r.quads; k += p.lanes) {
            let e = r.base + 4u * k;
            st4_y(e, affine4(4u * k, ((ld4a_h(e) - shift) - st.x) * st.y), e + 4u);
        }
    } else {
        // Each lane re-reads only the h elements it wrote itself, so no barrier is needed.
        let st = finish_stats(lid, at, shift, lane_residual_stat(r, shift, state, at.lane, p.lanes, at.live));
        for (var k = at.lane; at.live && k < r.quads; k += p.lanes) {
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (j < p.width) {
                    st_y(r.base + j, affine(j, ((ld_h(r.base + j) - shift) - st.x) * st.y));
                }
            }
        }
    }
}

// Row-block path (`lanes` = 1, chosen for CPU adapters): a workgroup of BLOCK invocations
// takes a block of BLOCK rows. One invocation per row reduces its row (the arithmetic, in the
// same order, of the lane-per-row path above) and leaves (K, mean − K, rstd) in workgroup
// memory; then each invocation normalizes its column quads down the block's rows from the
// core's cache with their γ and β in registers, read once per column instead of once per row
// (on a CPU driver their per-row vector loads cost about a quarter of `layer_norm_forward`), in tiles of
// three column quads that share each row's statistics (below).
const BLOCK: u32 = 64u;

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
    let rstd = 1.0 / sqrt(max(acc.m2 / f32(p.width), 0.0) + p.eps);
    mean_out[p.row_base + row] = shift + acc.mean;
    rstd_out[p.row_base + row] = rstd;
    block_stats[lid] = vec3<f32>(shift, acc.mean, rstd);
}

// Row phase of the plain and dropout passes: row block·BLOCK + lid.
fn block_row_stats(block: u32, lid: u32) {
    let row = block * BLOCK + lid;
    if (row >= p.rows) {
        return;
    }
    let r = row_of(Slot(row, 0u, true));
    let shift = ld_x(r.base);
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
    let shift = ld_residual(r.base);
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
// tile_columns: layer_norm/rows.wgsl).

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
