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

// #include "layer_norm/backward_common.wgsl"
// #vec4-variant

var<workgroup> shared_sums: array<vec3<f32>, WG>;

// g = dy·m·γ of the row's quad k (a whole quad; vec4 variant), m the mask's when `drop`.
fn g4(state: vec4<u32>, r: Row, k: u32, drop: bool) -> vec4<f32> {
    return ld4a_dy(r.base + 4u * k) * quad_factors(state, r, k, drop) * gamma4(4u * k);
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

// The row's K (its first input value) and rstd, or zeros for a spare segment.
fn row_start(at: Slot, base: u32) -> vec2<f32> {
    if (at.live) {
        return vec2<f32>(row_shift(ld_x(base)), rstd[p.row_base + at.row]);
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
