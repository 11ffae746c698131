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
//   lanes = 1:     the row-block path for CPU adapters, cpu/layer_norm/forward_blocks.wgsl.
// Binding ranges: a tensor larger than one storage binding is processed in row ranges; the
// activations are bound at the range's offset (indices here are local to it), mean and rstd are
// bound whole and indexed by the global row p.row_base + row, and the dropout's element index
// is global, so the mask is the single-binding one.
// Precision: activations stored as the variant says (f32, f16 or packed f16); f32 arithmetic;
// the variance is never E[x²] − E[x]². Statistics are taken around K, a value from the row
// itself (x[r, 0], or residual[r, 0] for the residual block), and rows are normalized as ((h − K) − (mean − K))·rstd, so off-centre rows
// (1000 + 0.1·randn) keep the precision of their spread.

// #include "layer_norm/forward_common.wgsl"
// #vec4-variant

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
    let st = row_norm(total);
    if (at.lane == 0u && at.live) {
        mean_out[p.row_base + at.row] = shift + total.mean;
        rstd_out[p.row_base + at.row] = st.y;
    }
    return st;
}

@compute @workgroup_size(256)
fn layer_norm_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    forward(slot_of(wid, nwg, lid), lid, DROPOUT);
}

// y = LN(x), then y ← y·m when `drop` (a literal at both calls, so each entry point holds only
// its own path: a CPU driver runs both sides of a branch under a lane mask).
fn forward(at: Slot, lid: u32, drop: bool) {
    let r = row_of(at);
    // Statistics are taken around the row's first value K.
    var shift = 0.0;
    if (at.live) {
        shift = row_shift(ld_x(r.base));
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
        shift = row_shift(ld_residual(r.base));
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
