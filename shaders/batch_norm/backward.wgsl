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

// #include "lib/philox.wgsl"
// #include "lib/nchw.wgsl"
// #include "lib/workgroup_reduce.wgsl"
// #include "batch_norm/backward_params.wgsl"
// #vec4-variant

const WG: u32 = 256u;

// Variants of every algorithm, set per pipeline (pipeline-overridable constants): the driver
// compiles each as a constant and drops the untaken side. CPU drivers such as lavapipe execute
// both sides of every runtime `if` under a lane mask, so a uniform flag would still pay for a
// Philox call or an accumulating load on every quad.
override DROPOUT: bool = false;     // dy times the fused dropout's regenerated mask
override EVAL: bool = false;        // running statistics: the reduce writes dx (see batch_norm_backward_eval_coef)
override PARK: bool = false;        // with DROPOUT, g = dy·m goes through dx: the reduce writes it,
                                    // the dx pass reads it back (one mask draw instead of two)
override ACCUMULATE: bool = false;  // batch_norm_backward_dx_aligned adds to dx (batch_norm_backward_dx reads FLAG_ACCUM_DX)

const FLAG_AFFINE: u32 = 1u;        // γ multiplies dx; dγ, dβ are produced
const FLAG_BATCH_STATS: u32 = 2u;   // the forward used batch statistics
const FLAG_ACCUM_DX: u32 = 4u;      // dx += instead of dx =
const FLAG_ACCUM_PARAMS: u32 = 8u;  // dγ += and dβ += instead of =

// The uniform's layout: batch_norm/backward_params.wgsl.

@group(0) @binding(0) var<uniform> p: Params;
// #activation @binding(1) read x (N, C, S)
// #activation @binding(2) read dy (N, C, S)
// #activation @binding(3) read_write dx (N, C, S)
@group(0) @binding(4) var<storage, read> weight: array<f32>;              // (C) γ
@group(0) @binding(5) var<storage, read> save_mean: array<f32>;           // (C)
@group(0) @binding(6) var<storage, read> save_invstd: array<f32>;         // (C)
@group(0) @binding(7) var<storage, read_write> partials: array<vec4<f32>>; // (C, chunks) (Σ(x−K), Σdy, Σdy(x−K), 0)
@group(0) @binding(8) var<storage, read_write> coef: array<vec4<f32>>;     // (C) (K, a, q, r): dx = a·g + q + r·(x − K)
@group(0) @binding(9) var<storage, read_write> dweight: array<f32>;       // (C) dγ
@group(0) @binding(10) var<storage, read_write> dbias: array<f32>;        // (C) dβ
@group(0) @binding(11) var<storage, read> rng_state: vec4<u32>;          // (seed lo, seed hi, offset lo, offset hi)

fn has(flag: u32) -> bool {
    return (p.flags & flag) != 0u;
}

// The value sums are centred on: a value of the channel (batch stats: x[0, c, 0], read by the
// first sample range and published in coef[c].x for the later ones) or the running mean.
fn centre_of(c: u32) -> f32 {
    if (!has(FLAG_BATCH_STATS)) {
        return save_mean[c];
    }
    if (p.first != 0u) {
        return ld_x(c * p.s);
    }
    return coef[c].x;
}

// The fused dropout's mask factors of the Philox group holding flat element i (of this
// range): m_j for the elements 4⌊(elem_base + i)/4⌋ + j. All ones without a fused dropout.
// `drop` is a constant at every call (DROPOUT), so the branch folds away when inlined.
fn mask_factors(i: u32, drop: bool) -> vec4<f32> {
    if (!drop) {
        return vec4<f32>(1.0);
    }
    return dropout_factors4(load_state(), (p.elem_base + i) / 4u, p.drop_threshold, p.drop_flags, p.drop_scale);
}

// dy of element i times its mask factor (one Philox call; the quad paths share one per 4).
fn upstream(i: u32, drop: bool) -> f32 {
    if (!drop) {
        return ld_dy(i);
    }
    return ld_dy(i) * mask_factors(i, drop)[(p.elem_base + i) % 4u];
}

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

// The reduce's centre K: centre_of, or with `eval` the running mean batch_norm_backward_eval_coef put in coef.
fn reduce_centre(c: u32, eval: bool) -> f32 {
    if (eval) {
        return coef[c].x;
    }
    return centre_of(c);
}

// batch_norm_backward_reduce with one invocation per (channel, chunk): no workgroup memory, no barriers (CPU
// adapters, `ReduceSplit::Invocation`).
@compute @workgroup_size(256)
fn batch_norm_backward_reduce_serial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    reduce_serial(gid.x + gid.y * nwg.x * WG, DROPOUT, EVAL, PARK);
}

fn reduce_serial(t: u32, drop: bool, eval: bool, park: bool) {
    if (t >= p.c * p.chunks) {
        return;
    }
    let c = t / p.chunks;
    let k = t % p.chunks;
    let centre = reduce_centre(c, eval);
    let begin = k * p.chunk_len;
    let sums = chunk_sums(c, begin, min(begin + p.chunk_len, p.m), 4u, centre, drop, eval, park);
    publish_partial(c, k, centre, sums, eval);
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

// γ·invstd of channel c (invstd without affine): dx's factor on g.
fn dx_scale(c: u32) -> f32 {
    var a = save_invstd[c];
    if (has(FLAG_AFFINE)) {
        a *= weight[c];
    }
    return a;
}

// Σ(x − K), Σdy, Σdy·(x − K) over channel-order indices start, start + stride, … (< end) of
// channel c, each the start of a quad of up to 4 consecutive elements (stride a multiple of
// 4), walking (n, s) by increments. A quad inside one sample that starts a Philox group
// (always when S % 4 == 0) is summed with vector operations and one Philox call; others
// element by element. With `eval` (running statistics) each element's dx = a·dy·m is written
// (or added) on the way, a = coef[c].y; with `park`, g = dy·m is written to dx.
fn chunk_sums(c: u32, start: u32, end: u32, stride: u32, centre: f32, drop: bool, eval: bool, park: bool) -> vec3<f32> {
    var a = 0.0;
    if (eval) {
        a = coef[c].y;
    }
    let step = walk_start(stride, p.s);
    var acc = vec3<f32>(0.0);
    var at = walk_start(start, p.s);
    for (var j = start; j < end; j += stride) {
        let i = walk_flat(at, c, p.s, p.c);
        // The host runs the reduce from the vec4 variant only when S % 4 == 0: every quad then
        // lies in one sample, starts on a vector and a Philox group, and ends by `end`, so the
        // test folds away there.
        if (VEC4 || (quad_fits(at.s, p.s, j, end) && (p.elem_base + i) % 4u == 0u)) {
            let xs = ld4a_x(i) - centre;
            let g = ld4a_dy(i) * mask_factors(i, drop);
            acc += vec3<f32>(dot(xs, vec4<f32>(1.0)), dot(g, vec4<f32>(1.0)), dot(g, xs));
            if (park) {
                st4_dx(i, g, p.total);
            }
            if (eval) {
                var out = a * g;
                if (has(FLAG_ACCUM_DX)) {
                    out += ld4a_dx(i);
                }
                st4_dx(i, out, p.total);
            }
        } else {
            var e = at;
            for (var t = 0u; t < 4u && j + t < end; t++) {
                let ie = walk_flat(e, c, p.s, p.c);
                let xs = ld_x(ie) - centre;
                let g = upstream(ie, drop);
                acc += vec3<f32>(xs, g, g * xs);
                if (park) {
                    st_dx(ie, g);
                }
                if (eval) {
                    st_dx(ie, select(0.0, ld_dx(ie), has(FLAG_ACCUM_DX)) + a * g);
                }
                e = walk_step(e, Walk(0u, 1u), p.s);
            }
        }
        at = walk_step(at, step, p.s);
    }
    return acc;
}

// Writes chunk k's sums of channel c; the first range's chunk 0 also publishes K (not with
// `eval`: coef then holds what the other chunks still read, and finalize's K is the running
// mean).
fn publish_partial(c: u32, k: u32, centre: f32, total: vec3<f32>, eval: bool) {
    partials[c * p.parts + p.part_base + k] = vec4<f32>(total, 0.0);
    if (!eval && p.first != 0u && k == 0u) {
        coef[c] = vec4<f32>(centre, 0.0, 0.0, 0.0);
    }
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

// batch_norm_backward_finalize with one invocation per channel summing its partials in order (pairs with
// batch_norm_backward_reduce_serial).
@compute @workgroup_size(64)
fn batch_norm_backward_finalize_serial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= p.c) {
        return;
    }
    finish_channel(c, sum_partials(c, 0u, 1u));
}

// Sum of channel c's partials first, first + stride, … (< parts).
fn sum_partials(c: u32, first: u32, stride: u32) -> vec3<f32> {
    var acc = vec3<f32>(0.0);
    for (var k = first; k < p.parts; k += stride) {
        acc += partials[c * p.parts + k].xyz;
    }
    return acc;
}

// dγ, dβ (written or added to) and the dx coefficients of channel c from its sums.
fn finish_channel(c: u32, total: vec3<f32>) {
    let m = f32(p.m_all);
    let invstd = save_invstd[c];
    let centre = select(save_mean[c], coef[c].x, has(FLAG_BATCH_STATS));
    // mean − K: exact from the data with batch statistics; K is the mean otherwise.
    let mk = select(0.0, total.x / m, has(FLAG_BATCH_STATS));
    let sum_dy = total.y;
    let sum_dy_xhat = invstd * (total.z - mk * sum_dy);
    if (has(FLAG_AFFINE)) {
        let accumulate = has(FLAG_ACCUM_PARAMS);
        dweight[c] = select(0.0, dweight[c], accumulate) + sum_dy_xhat;
        dbias[c] = select(0.0, dbias[c], accumulate) + sum_dy;
    }
    let a = dx_scale(c);
    // dx = a·(g − Σdy/M − x̂·Σdy·x̂/M), x̂ = ((x − K) − (mean − K))·invstd, as
    // dx = a·g + q + r·(x − K) with r = −a·invstd·Σdy·x̂/M and q = −a·Σdy/M − r·(mean − K):
    // one coefficient load per quad in the dx pass. Both r-terms are of the data's spread
    // around K (a value of the channel), so nothing large cancels. Running statistics: a·g.
    var q = 0.0;
    var r = 0.0;
    if (has(FLAG_BATCH_STATS)) {
        r = -a * invstd * (sum_dy_xhat / m);
        q = -a * (sum_dy / m) - r * mk;
    }
    coef[c] = vec4<f32>(centre, a, q, r);
}

// dx coefficients of channel c: (K, a, q, r), dx = a·g + q + r·(x − K) (see finish_channel).
fn dx_coef(c: u32) -> vec4<f32> {
    return coef[c];
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
