// BatchNorm backward over (N, C, S), M = N·S per channel, from the forward's saved mean and
// invstd (what it normalized with):
//
//   x̂ = (x − mean)·invstd        dγ_c = Σ dy·x̂        dβ_c = Σ dy         (sums over n, s)
//   batch statistics:   dx = γ·invstd·(dy − Σdy/M − x̂·Σ(dy·x̂)/M)
//   running statistics: dx = γ·invstd·dy
//
// With a fused dropout (forward y = BN(x)·m), dy is multiplied by the regenerated mask factor
// m_i on load: the backward of dropout applied inside BatchNorm's backward, no mask stored.
//
// Precision: like the forward, sums are taken around K (x[0, c, 0] with batch statistics, the
// running mean otherwise): the reduce pass accumulates Σ(x − K), Σdy and Σdy·(x − K), so
// mean − K = Σ(x − K)/M is recomputed exactly instead of being recovered from the rounded saved
// mean, and Σdy·x̂ = invstd·(Σdy·(x − K) − (mean − K)·Σdy).
//
// Binding ranges: an input larger than one storage binding is processed in ranges of whole samples;
// batch_norm_backward_reduce and batch_norm_backward_dx run once per range (x, dy, dx bound at its offset), partial sums of
// every range are merged by batch_norm_backward_finalize, and the dropout index is global.
//
// Entry points (algorithms), each specialised per pipeline by the override flags below:
//   batch_norm_backward_reduce          one workgroup per (channel, chunk): the three sums of the chunk.
//   batch_norm_backward_reduce_serial   one invocation per (channel, chunk), no workgroup merge (CPU adapters:
//                       `ReduceSplit::Invocation`).
//   batch_norm_backward_finalize        one workgroup per channel: merges chunk sums; writes (or adds to) dγ,
//                       dβ; writes the channel's dx coefficients (K, a, q, r):
//                       dx = a·g + q + r·(x − K). batch_norm_backward_finalize_serial: one invocation per
//                       channel (pairs with the serial reduce).
//   batch_norm_backward_dx              one invocation per 4 consecutive elements: dx (written or added to).
//   batch_norm_backward_dx_aligned      the same for S % 4 == 0 (every quad in one channel), p.run quads per
//                       invocation, no per-element walk.
//   batch_norm_backward_eval_coef       running statistics (eval), where dx = γ·invstd·dy needs no reduction:
//                       (K = running mean, a = γ·invstd) per channel into coef; the reduce with
//                       EVAL then writes dx while it sums, batch_norm_backward_finalize runs only for dγ, dβ
//                       (when affine), and there is no dx pass. Traffic: 3 passes, the minimum.

// #include "lib/workgroup_reduce.wgsl"
// #include "lib/nchw.wgsl"
// #include "batch_norm/backward_common.wgsl"
// #vec4-variant

@compute @workgroup_size(256)
fn batch_norm_backward_reduce(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    reduce(wid.x + wid.y * nwg.x, lid, DROPOUT, EVAL, PARK);
}

// batch_norm_backward_reduce of workgroup w; `drop`: dy is multiplied by the fused dropout's mask; `eval`:
// running statistics, dx written on the way (coef from batch_norm_backward_eval_coef); `park`: g = dy·m
// written to dx for the dx pass with PARK.
fn reduce(w: u32, lid: u32, drop: bool, eval: bool, park: bool) {
    if (w >= p.c * p.chunks) {
        return; // padding workgroup of a folded dispatch (uniform across the workgroup)
    }
    let c = w / p.chunks;
    let k = w % p.chunks;
    let centre = reduce_centre(c, eval);
    // Each invocation takes quads strided by 4·WG; the workgroup sums.
    let begin = k * p.chunk_len;
    let mine = chunk_sums(c, begin + 4u * lid, min(begin + p.chunk_len, p.m), 4u * WG, centre, drop, eval, park);
    let total = workgroup_sum3(lid, mine);
    if (lid == 0u) {
        publish_partial(c, k, centre, total, eval);
    }
}

// (K = running mean, a = γ·invstd) of every channel for the eval reduce passes (running
// statistics: dx = a·dy·m), one invocation per channel.
@compute @workgroup_size(64)
fn batch_norm_backward_eval_coef(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= p.c) {
        return;
    }
    coef[c] = vec4<f32>(save_mean[c], dx_scale(c), 0.0, 0.0);
}

@compute @workgroup_size(256)
fn batch_norm_backward_finalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = wid.x + wid.y * nwg.x;
    if (c >= p.c) {
        return;
    }
    let total = workgroup_sum3(lid, sum_partials(c, lid, WG));
    if (lid == 0u) {
        finish_channel(c, total);
    }
}

// SyncBatchNorm's split of a backward with batch statistics (the host all-reduces the two
// sums between the passes):
//   batch_norm_backward_export          one workgroup per channel, after the reduce: the
//                       channel's (K, Σ(x − K), Σdy, Σdy·(x − K)) into coef[c], read back.
//   batch_norm_backward_finalize_imported  one invocation per channel, after the host wrote
//                       coef[c] = (K, mean − K, Σdy, Σdy·x̂) over every rank (mean the global
//                       one, K the local one) and coef[C + c] = (this rank's Σdy, Σdy·x̂, M over
//                       every rank, 0): dγ, dβ from this rank's sums (written or added to) and
//                       the dx coefficients from the global ones.
@compute @workgroup_size(256)
fn batch_norm_backward_export(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = wid.x + wid.y * nwg.x;
    if (c >= p.c) {
        return;
    }
    let total = workgroup_sum3(lid, sum_partials(c, lid, WG));
    if (lid == 0u) {
        coef[c] = vec4<f32>(coef[c].x, total);
    }
}

@compute @workgroup_size(64)
fn batch_norm_backward_finalize_imported(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= p.c) {
        return;
    }
    let global = coef[c];
    let local = coef[p.c + c];
    let m = local.z;
    if (has(FLAG_AFFINE)) {
        let accumulate = has(FLAG_ACCUM_PARAMS);
        dweight[c] = select(0.0, dweight[c], accumulate) + local.y;
        dbias[c] = select(0.0, dbias[c], accumulate) + local.x;
    }
    let a = dx_scale(c);
    let r = -a * save_invstd[c] * (global.w / m);
    let q = -a * (global.z / m) - r * global.y;
    coef[c] = vec4<f32>(global.x, a, q, r);
}

// dx coefficients of channel c: (K, a, q, r), dx = a·g + q + r·(x − K) (see finish_channel).
fn dx_coef(c: u32) -> vec4<f32> {
    return coef[p.chan_base + c];
}

// dx (before accumulation) from x and the masked dy of elements of one channel.
fn dx_of(k: vec4<f32>, x: vec4<f32>, g: vec4<f32>) -> vec4<f32> {
    return k.y * g + k.z + k.w * (x - k.x);
}

@compute @workgroup_size(256)
fn batch_norm_backward_dx(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    dx_quad(gid.x + gid.y * nwg.x * WG, DROPOUT && !PARK, PARK);
}

// batch_norm_backward_dx of invocation g (elements 4g .. 4g + 3); `drop` as in `reduce`; `parked`: g = dy·m
// from dx.
fn dx_quad(g: u32, drop: bool, parked: bool) {
    let first = g * 4u;
    if (first >= p.total) {
        return;
    }
    // first and elem_base are multiples of 4: the four elements share one Philox call.
    let m = mask_factors(first, drop);
    var pos = channel_position(first, p.s, p.c, p.div_s, p.div_c);
    var k = dx_coef(pos.x);
    var out: vec4<f32>;
    if (quad_fits(pos.y, p.s, first, p.total)) {
        // One channel (always when S % 4 == 0 away from the end): vector arithmetic.
        out = dx_vector(first, k, m, parked, has(FLAG_ACCUM_DX));
    } else {
        for (var j = 0u; j < 4u && first + j < p.total; j++) {
            if (j > 0u) {
                let next = next_position(pos, p.s, p.c);
                if (next.x != pos.x) {
                    k = dx_coef(next.x);
                }
                pos = next;
            }
            let i = first + j;
            let g = select(ld_dy(i) * m[j], ld_dx(i), parked);
            let d = dx_of(k, vec4<f32>(ld_x(i)), vec4<f32>(g)).x;
            out[j] = select(0.0, ld_dx(i), has(FLAG_ACCUM_DX)) + d;
        }
    }
    st4_dx(first, out, p.total);
}

// dx of the quad from element `first`, all four in the channel of coefficients k; m: its mask
// factors; `parked`: g = dy·m from dx; `accumulate`: added to dx.
fn dx_vector(first: u32, k: vec4<f32>, m: vec4<f32>, parked: bool, accumulate: bool) -> vec4<f32> {
    var g = ld4a_dy(first) * m;
    if (parked) {
        g = ld4a_dx(first);
    }
    var out = dx_of(k, ld4a_x(first), g);
    if (accumulate) {
        out += ld4a_dx(first);
    }
    return out;
}

// batch_norm_backward_dx for S % 4 == 0 (the host's choice), where every quad lies in one channel: no
// per-element walk, and writing or accumulating as a constant (ACCUMULATE). A CPU driver
// executes an `if` under a lane mask whether or not a lane takes it, so dx_quad pays for its
// per-element path and the accumulating load on every quad (lavapipe: batch_norm_train_backward about
// 1.17x faster without them). Invocation g takes the p.run
// quads from element 4·run·g (the host keeps S ≥ 4·run: 8 on CPU adapters where S allows, else
// 1), reading its channel's coefficients and the next channel's once, as the forward's
// normalize_run does.
fn dx_aligned(g: u32, drop: bool, parked: bool, accumulate: bool) {
    var first = g * p.run * 4u;
    if (first >= p.total) {
        return;
    }
    let pos = channel_position(first, p.s, p.c, p.div_s, p.div_c);
    var k = dx_coef(pos.x);
    var k_next = k;
    if (p.run > 1u) {
        k_next = dx_coef(next_channel(pos.x, p.c));
    }
    var s = pos.y;
    for (var r = 0u; r < p.run && first < p.total; r++) {
        st4_dx(first, dx_vector(first, k, mask_factors(first, drop), parked, accumulate), p.total);
        first += 4u;
        // The one entry into the next channel (s passes S once: 4·run ≤ S).
        s += 4u;
        k = select(k, k_next, s == p.s);
    }
}

@compute @workgroup_size(256)
fn batch_norm_backward_dx_aligned(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    dx_aligned(gid.x + gid.y * nwg.x * WG, DROPOUT && !PARK, PARK, ACCUMULATE);
}
