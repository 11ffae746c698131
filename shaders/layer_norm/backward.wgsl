// LayerNorm backward over rows of width W, from the forward's saved rstd:
//
//   x̂ = (x − mean)·rstd    g = dy·γ    dx = rstd·(g − mean_j(g) − x̂·mean_j(g·x̂))
//   dγ_j = Σ_rows dy·x̂     dβ_j = Σ_rows dy
//
// Fusions (the forward's dropout, backward applied inside these passes, mask regenerated):
//   LayerNorm → dropout (layer_norm_backward_dx, layer_norm_backward_params_partial with DROPOUT): dy ← dy·m on load.
//   residual block (layer_norm_backward_residual_dx): forward h = residual + x·m, y = LN(h). Given dy (for y)
//     and optionally dh_in (gradient reaching h from elsewhere, e.g. the next residual add):
//     dh = LN_backward(dy) + dh_in, dresidual = dh, dx = dh·m.
//
// Binding ranges: a tensor larger than one storage binding is processed in ranges of whole 64-row
// blocks. Activations are bound at the range's offset and indexed locally; per-row and
// per-block arrays are bound whole and indexed globally (row_base, block_base); the mask is
// the single-binding one.
//
// Precision: as in the forward, sums are taken around K = the row's first value, and the
// row's mean − K is recomputed exactly from Σ(x − K), so x̂ never subtracts a rounded mean
// near the data's magnitude.
//
// Entry points, in order:
//   layer_norm_backward_dx / layer_norm_backward_residual_dx  `lanes` invocations per row, 256/lanes rows per workgroup (as in
//                             the forward); rows of at most 16·lanes from registers, wider
//                             rows re-read;
//                             writes dx and the row's (K, mean − K).
//   layer_norm_backward_params_partial        one invocation per (4 columns, block of 64 rows): partial dγ, dβ.
//   layer_norm_backward_gamma_stage           before the row-block pass: γ into its uniform copy.
//   layer_norm_backward_block_dx / layer_norm_backward_block_residual_dx   instead of the two above when `lanes` is 1: one
//                             workgroup per block of 64 rows writes dx and the block's partials.
//   layer_norm_backward_params_final          one invocation per column: sums the partials (no float atomics).

// #include "lib/philox.wgsl"
// #include "layer_norm/rows.wgsl"
// #include "layer_norm/backward_params.wgsl"
// #include "layer_norm/residual_emit.wgsl"
// #include "cpu/layer_norm/columns.wgsl"
// #vec4-variant

const WG: u32 = 256u;
const REGS: u32 = 16u;
const ROWS_PER_BLOCK: u32 = 64u;

// Variants, set per pipeline (pipeline-overridable constants): the driver compiles each as a
// constant and drops the untaken side, which a CPU driver would otherwise execute under a lane
// mask (both sides of every runtime branch).
override DROPOUT: bool = false;     // dy ← dy·m, LayerNorm → dropout's mask
override ACCUMULATE: bool = false;  // dx (and dresidual) += instead of =

const FLAG_WEIGHT: u32 = 1u;
const FLAG_BIAS: u32 = 2u;
const FLAG_ACCUM_DX: u32 = 4u;       // dx (and dresidual) +=
const FLAG_ACCUM_PARAMS: u32 = 8u;   // dγ, dβ +=
// FLAG_DH_IN (32, residual block: add dh_in to dh) and residual_emit4: layer_norm/residual_emit.wgsl.

// The uniform's layout: layer_norm/backward_params.wgsl.

@group(0) @binding(0) var<uniform> p: Params;
// #activation @binding(1) read x (rows, W) LN input (h for the residual block)
// #activation @binding(2) read dy (rows, W)
// #activation @binding(3) read_write dx (rows, W)
// #param @binding(4) weight (W) γ
@group(0) @binding(5) var<storage, read> rstd: array<f32>;                  // (rows)
@group(0) @binding(6) var<storage, read_write> row_centre: array<vec2<f32>>; // (rows) (K, mean − K)
@group(0) @binding(7) var<storage, read_write> partials: array<vec2<f32>>;  // (row_blocks, W) (Σdy·x̂, Σdy)
@group(0) @binding(8) var<storage, read_write> dweight: array<f32>;         // (W)
@group(0) @binding(9) var<storage, read_write> dbias: array<f32>;           // (W)
@group(0) @binding(10) var<storage, read> rng_state: vec4<u32>;            // (seed lo, seed hi, offset lo, offset hi)
// #activation @binding(11) read dh_in (rows, W)
// #activation @binding(12) read_write dresidual (rows, W)
// γ of the first 4·GAMMA_QUADS columns as a uniform buffer, for the row-block pass's row phase,
// where every invocation reads all of γ once per row: lavapipe loads a uniform buffer as one
// vector gather, a storage buffer lane by lane with a branch per lane. With γ, layer_norm_backward_gamma_stage fills it (binding 14, the same buffer) before the
// pass; without γ the host created it holding ones. The other dx passes bind it without
// reading it.
const GAMMA_QUADS: u32 = 1024u;
@group(0) @binding(13) var<uniform> gamma_u: array<vec4<f32>, GAMMA_QUADS>;
@group(0) @binding(14) var<storage, read_write> gamma_stage: array<f32>;

var<workgroup> shared_sums: array<vec3<f32>, WG>;

fn has(flag: u32) -> bool {
    return (p.flags & flag) != 0u;
}

fn gamma(j: u32) -> f32 {
    return select(1.0, ld_weight(j), has(FLAG_WEIGHT));
}

// γ of columns j .. j + 3 (j a multiple of 4).
fn gamma4(j: u32) -> vec4<f32> {
    return select(vec4<f32>(1.0), ld4a_weight(j), has(FLAG_WEIGHT));
}

// γ of column j from the uniform copy when `staged` (a literal at every call; j <
// 4·GAMMA_QUADS), else from `weight`.
fn row_gamma(j: u32, staged: bool) -> f32 {
    if (staged) {
        return gamma_u[j >> 2u][j & 3u];
    }
    return gamma(j);
}

// Copies γ of the first 4·GAMMA_QUADS columns into the uniform copy (run only with γ); one
// invocation per column.
@compute @workgroup_size(256)
fn layer_norm_backward_gamma_stage(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x < min(p.width, 4u * GAMMA_QUADS)) {
        gamma_stage[gid.x] = ld_weight(gid.x);
    }
}

// g = dy·m·γ of the row's quad k (a whole quad; vec4 variant), m the mask's when `drop`.
fn g4(state: vec4<u32>, r: Row, k: u32, drop: bool) -> vec4<f32> {
    return ld4a_dy(r.base + 4u * k) * quad_factors(state, r, k, drop) * gamma4(4u * k);
}

// (Σ(x − K), Σg, Σg·(x − K)) of one quad.
fn quad_sums(xs: vec4<f32>, g: vec4<f32>) -> vec3<f32> {
    return vec3<f32>(dot(xs, vec4<f32>(1.0)), dot(g, vec4<f32>(1.0)), dot(g, xs));
}

// Sums one row's lane segment; every lane gets the total, added in the same order. Two
// barriers whatever the segment's width (as segment_merge in layer_norm/forward.wgsl): the first lane of
// every group of SEG_FOLD sums its group, then every lane sums the group partials itself.
// Called once per dispatch (a second call would need a barrier first).
fn segment_sum3(lid: u32, lane: u32, mine: vec3<f32>) -> vec3<f32> {
    shared_sums[lid] = mine;
    workgroupBarrier();
    let fold = min(p.lanes, SEG_FOLD);
    if ((lane & (fold - 1u)) == 0u) {
        var acc = mine;
        for (var k = 1u; k < fold; k++) {
            acc += shared_sums[lid + k];
        }
        shared_sums[lid] = acc;
    }
    workgroupBarrier();
    let first = lid - lane;
    var total = shared_sums[first];
    for (var g = fold; g < p.lanes; g += fold) {
        total += shared_sums[first + g];
    }
    return total;
}

// Row coefficients from the sums (Σ(x−K), Σg, Σg·(x−K)): (mean − K, mean(g), mean(g·x̂)).
// Lane 0 stores (K, mean − K) for the column pass.
fn row_coefficients(lid: u32, at: Slot, shift: f32, r: f32, sums: vec3<f32>) -> vec3<f32> {
    let cf = coefficients_of(segment_sum3(lid, at.lane, sums), r);
    if (at.lane == 0u && at.live) {
        row_centre[p.row_base + at.row] = vec2<f32>(shift, cf.x);
    }
    return cf;
}

// (mean − K, mean(g), mean(g·x̂)) from a whole row's sums (Σ(x−K), Σg, Σg·(x−K)) and rstd r.
fn coefficients_of(total: vec3<f32>, r: f32) -> vec3<f32> {
    let w = f32(p.width);
    let mk = total.x / w;
    return vec3<f32>(mk, total.y / w, r * (total.z - mk * total.y) / w);
}

// (Σ(x − K), Σg, Σg·(x − K)), g = dy·m·γ (m the mask's when `drop`), over the row's quads
// first, first + stride, … below `end` (none unless `live`), element by element (the scalar
// paths); γ from the uniform copy when `staged` (quads below GAMMA_QUADS only).
fn lane_sums(
    state: vec4<u32>, r: Row, shift: f32, first: u32, end: u32, stride: u32, live: bool, drop: bool, staged: bool,
) -> vec3<f32> {
    var sums = vec3<f32>(0.0);
    for (var k = first; live && k < end; k += stride) {
        let m = quad_factors(state, r, k, drop);
        for (var t = 0u; t < 4u; t++) {
            let j = column(r, k, t);
            if (j < p.width) {
                let xs = ld_x(r.base + j) - shift;
                let g = ld_dy(r.base + j) * m[t] * row_gamma(j, staged);
                sums += vec3<f32>(xs, g, g * xs);
            }
        }
    }
    return sums;
}

// dh of one element from its centred input xs = x − K and its g = dy·γ.
fn dh_of(xs: f32, g: f32, r: f32, cf: vec3<f32>) -> f32 {
    let xhat = (xs - cf.x) * r;
    return r * (g - cf.y - xhat * cf.z);
}

// dh_of of a quad.
fn dh_of4(xs: vec4<f32>, g: vec4<f32>, r: f32, cf: vec3<f32>) -> vec4<f32> {
    let xhat = (xs - cf.x) * r;
    return r * (g - cf.y - xhat * cf.z);
}

fn emit(out_index: u32, v: f32) {
    var out = v;
    if (has(FLAG_ACCUM_DX)) {
        out += ld_dx(out_index);
    }
    st_dx(out_index, out);
}

// The row's K (its first input value) and rstd, or zeros for a spare segment.
fn row_start(at: Slot, base: u32) -> vec2<f32> {
    if (at.live) {
        return vec2<f32>(ld_x(base), rstd[p.row_base + at.row]);
    }
    return vec2<f32>(0.0);
}

// The dx pass: with DROPOUT, LayerNorm → dropout's mask on dy (dy ← dy·m); with ACCUMULATE,
// adding to dx (the uniform's FLAG_ACCUM_DX is set too) instead of writing it.
@compute @workgroup_size(256)
fn layer_norm_backward_dx(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    dx_rows(slot_of(wid, nwg, lid), lid, DROPOUT, ACCUMULATE);
}

fn dx_rows(at: Slot, lid: u32, drop: bool, accumulate: bool) {
    let r = row_of(at);
    let start = row_start(at, r.base);
    let shift = start.x;
    let rs = start.y;
    var state = vec4<u32>(0u);
    if (drop) {
        state = load_state();
    }
    if (in_registers()) {
        // Read x and dy once into registers (slot 4i + t: element t of the lane's i-th quad).
        var xs: array<f32, REGS>;
        var gs: array<f32, REGS>;
        var sums = vec3<f32>(0.0);
        for (var i = 0u; i < REGS / 4u; i++) {
            let k = at.lane + i * p.lanes;
            let m = quad_factors(state, r, k, drop);
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (at.live && k < r.quads && j < p.width) {
                    xs[4u * i + t] = ld_x(r.base + j) - shift;
                    gs[4u * i + t] = ld_dy(r.base + j) * m[t] * gamma(j);
                    sums += vec3<f32>(xs[4u * i + t], gs[4u * i + t], gs[4u * i + t] * xs[4u * i + t]);
                }
            }
        }
        let cf = row_coefficients(lid, at, shift, rs, sums);
        for (var i = 0u; i < REGS / 4u; i++) {
            let k = at.lane + i * p.lanes;
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (at.live && k < r.quads && j < p.width) {
                    emit(r.base + j, dh_of(xs[4u * i + t], gs[4u * i + t], rs, cf));
                }
            }
        }
    } else if (VEC4) {
        // Rows of whole quads (vec4 variant, W % 4 == 0): vector loads and stores. Writing dx,
        // the first loop parks g = dy·m·γ in dx (this lane's own quads), so the second reads
        // it back instead of drawing the mask and reading dy and γ again.
        var sums = vec3<f32>(0.0);
        for (var k = at.lane; at.live && k < r.quads; k += p.lanes) {
            let e = r.base + 4u * k;
            let g = g4(state, r, k, drop);
            sums += quad_sums(ld4a_x(e) - shift, g);
            if (!accumulate) {
                st4_dx(e, g, e + 4u);
            }
        }
        let cf = row_coefficients(lid, at, shift, rs, sums);
        for (var k = at.lane; at.live && k < r.quads; k += p.lanes) {
            let e = r.base + 4u * k;
            if (accumulate) {
                st4_dx(e, ld4a_dx(e) + dh_of4(ld4a_x(e) - shift, g4(state, r, k, drop), rs, cf), e + 4u);
            } else {
                st4_dx(e, dh_of4(ld4a_x(e) - shift, ld4a_dx(e), rs, cf), e + 4u);
            }
        }
    } else {
        let sums = lane_sums(state, r, shift, at.lane, r.quads, p.lanes, at.live, drop, false);
        let cf = row_coefficients(lid, at, shift, rs, sums);
        for (var k = at.lane; at.live && k < r.quads; k += p.lanes) {
            let m = quad_factors(state, r, k, drop);
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (j < p.width) {
                    let g = ld_dy(r.base + j) * m[t] * gamma(j);
                    emit(r.base + j, dh_of(ld_x(r.base + j) - shift, g, rs, cf));
                }
            }
        }
    }
}

// The residual block's backward: x here is the saved h; dx is the gradient of the dropout's
// input (dh·m, m the multiplier of element e); dresidual = dh.
fn residual_emit(e: u32, dh_ln: f32, m: f32) {
    var dh = dh_ln;
    if (has(FLAG_DH_IN)) {
        dh += ld_dh_in(e);
    }
    var dres = dh;
    var dx = dh * m;
    if (has(FLAG_ACCUM_DX)) {
        dres += ld_dresidual(e);
        dx += ld_dx(e);
    }
    st_dresidual(e, dres);
    st_dx(e, dx);
}

// The residual block's dx writing dx and dresidual, or (ACCUMULATE) adding to them.
@compute @workgroup_size(256)
fn layer_norm_backward_residual_dx(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    residual_dx(slot_of(wid, nwg, lid), lid, ACCUMULATE);
}

fn residual_dx(at: Slot, lid: u32, accumulate: bool) {
    let r = row_of(at);
    let start = row_start(at, r.base);
    let shift = start.x;
    let rs = start.y;
    let state = load_state();
    if (in_registers()) {
        var xs: array<f32, REGS>;
        var gs: array<f32, REGS>;
        var sums = vec3<f32>(0.0);
        for (var i = 0u; i < REGS / 4u; i++) {
            let k = at.lane + i * p.lanes;
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (at.live && k < r.quads && j < p.width) {
                    xs[4u * i + t] = ld_x(r.base + j) - shift;
                    gs[4u * i + t] = ld_dy(r.base + j) * gamma(j);
                    sums += vec3<f32>(xs[4u * i + t], gs[4u * i + t], gs[4u * i + t] * xs[4u * i + t]);
                }
            }
        }
        let cf = row_coefficients(lid, at, shift, rs, sums);
        for (var i = 0u; i < REGS / 4u; i++) {
            let k = at.lane + i * p.lanes;
            let m = drop4(state, r.q0 + k);
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (at.live && k < r.quads && j < p.width) {
                    residual_emit(r.base + j, dh_of(xs[4u * i + t], gs[4u * i + t], rs, cf), m[t]);
                }
            }
        }
    } else if (VEC4) {
        // Rows of whole quads, as in dx_rows (g parked in dx when writing).
        var sums = vec3<f32>(0.0);
        for (var k = at.lane; at.live && k < r.quads; k += p.lanes) {
            let e = r.base + 4u * k;
            let g = g4(state, r, k, false);
            sums += quad_sums(ld4a_x(e) - shift, g);
            if (!accumulate) {
                st4_dx(e, g, e + 4u);
            }
        }
        let cf = row_coefficients(lid, at, shift, rs, sums);
        for (var k = at.lane; at.live && k < r.quads; k += p.lanes) {
            let e = r.base + 4u * k;
            var g: vec4<f32>;
            if (accumulate) {
                g = g4(state, r, k, false);
            } else {
                g = ld4a_dx(e);
            }
            residual_emit4(e, dh_of4(ld4a_x(e) - shift, g, rs, cf), drop4(state, r.q0 + k), accumulate);
        }
    } else {
        let sums = lane_sums(state, r, shift, at.lane, r.quads, p.lanes, at.live, false, false);
        let cf = row_coefficients(lid, at, shift, rs, sums);
        for (var k = at.lane; at.live && k < r.quads; k += p.lanes) {
            let m = drop4(state, r.q0 + k);
            for (var t = 0u; t < 4u; t++) {
                let j = column(r, k, t);
                if (j < p.width) {
                    let dh = dh_of(ld_x(r.base + j) - shift, ld_dy(r.base + j) * gamma(j), rs, cf);
                    residual_emit(r.base + j, dh, m[t]);
                }
            }
        }
    }
}

// Row-block path (`lanes` = 1, chosen for CPU adapters): a workgroup of BLOCK invocations
// takes a block of BLOCK rows, the partial pass's block, and does the dx pass and the dγ/dβ
// partials itself. First one invocation per row sums its row; the row coefficients go to
// workgroup memory. Then each invocation walks its column quads (up to three at a time, in
// tiles below) down the block's rows (the same bytes, now in the core's cache), writes dx and
// sums the columns' dγ, dβ partials, reading γ once per column instead of once per element. x and dy are read from memory once and dx
// written once, the minimum; the mask is drawn once per element unless accumulating with
// LayerNorm → dropout.

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
    let shift = ld_x(r.base);
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

@compute @workgroup_size(256)
fn layer_norm_backward_params_partial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    params_partial(wid.x + wid.y * nwg.x, lid, DROPOUT);
}

// Invocation (tile, lid) of block `block` takes columns j0 .. j0 + 3, j0 = 4·(tile·WG + lid): the
// four elements of a row are consecutive, so their mask words come from at most two Philox
// calls (one when rows start on quads).
fn params_partial(w: u32, lid: u32, drop: bool) {
    let tile = w % p.col_tiles;
    let block = w / p.col_tiles;
    let j0 = 4u * (tile * WG + lid);
    if (block >= p.row_blocks || j0 >= p.width) {
        return;
    }
    var state = vec4<u32>(0u);
    if (drop) {
        state = load_state();
    }
    let first = block * ROWS_PER_BLOCK;
    let last = min(first + ROWS_PER_BLOCK, p.rows);
    var gx = vec4<f32>(0.0);
    var gs = vec4<f32>(0.0);
    if (VEC4) {
        // Rows of whole quads (W % 4 == 0): the four columns are one aligned quad of each
        // row, and one Philox call's.
        for (var row = first; row < last; row++) {
            let e = row * p.width + j0;
            let rc = row_centre[p.row_base + row];
            let xhat = ((ld4a_x(e) - rc.x) - rc.y) * rstd[p.row_base + row];
            var g = ld4a_dy(e);
            if (drop) {
                g *= drop4(state, (p.row_base * p.width + e) >> 2u);
            }
            gx += g * xhat;
            gs += g;
        }
        for (var t = 0u; t < 4u; t++) {
            partials[(p.block_base + block) * p.width + j0 + t] = vec2<f32>(gx[t], gs[t]);
        }
        return;
    }
    for (var row = first; row < last; row++) {
        let e = row * p.width + j0;
        let rc = row_centre[p.row_base + row];
        let rs = rstd[p.row_base + row];
        var m = vec4<f32>(1.0);
        if (drop) {
            m = drop_span(state, p.row_base * p.width + e);
        }
        for (var t = 0u; t < 4u; t++) {
            if (j0 + t < p.width) {
                let xhat = ((ld_x(e + t) - rc.x) - rc.y) * rs;
                let g = ld_dy(e + t) * m[t];
                gx[t] += g * xhat;
                gs[t] += g;
            }
        }
    }
    for (var t = 0u; t < 4u; t++) {
        if (j0 + t < p.width) {
            partials[(p.block_base + block) * p.width + j0 + t] = vec2<f32>(gx[t], gs[t]);
        }
    }
}

@compute @workgroup_size(256)
fn layer_norm_backward_params_final(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = gid.x + gid.y * nwg.x * WG;
    if (j >= p.width) {
        return;
    }
    var acc = vec2<f32>(0.0);
    for (var b = 0u; b < p.total_blocks; b++) {
        acc += partials[b * p.width + j];
    }
    let accumulate = has(FLAG_ACCUM_PARAMS);
    if (has(FLAG_WEIGHT)) {
        dweight[j] = select(0.0, dweight[j], accumulate) + acc.x;
    }
    if (has(FLAG_BIAS)) {
        dbias[j] = select(0.0, dbias[j], accumulate) + acc.y;
    }
}
