// BatchNorm forward over an (N, C, *) tensor, viewed as (N, C, S) with S = ∏ spatial dims.
// Statistics are per channel over M = N·S elements:
//
//   mean_c    = (1/M) Σ_{n,s} x[n,c,s]
//   var_c     = (1/M) Σ_{n,s} (x[n,c,s] − mean_c)²          biased: used to normalize
//   invstd_c  = 1 / sqrt(var_c + eps)
//   y[n,c,s]  = (x[n,c,s] − mean_c) · invstd_c · γ_c + β_c
//   running_mean_c ← (1 − m)·running_mean_c + m·mean_c
//   running_var_c  ← (1 − m)·running_var_c  + m·var_c·M/(M − 1)   unbiased
//   m = momentum, or 1/num_batches_tracked (cumulative average) when momentum is None.
//
// Entry points, recorded in this order into one command buffer:
//   batch_norm_stats          one workgroup per (channel, chunk). Each channel's M elements are cut into
//                     `chunks` chunks of `chunk_len`; each invocation runs Welford over a strided
//                     slice of its chunk, the workgroup merges with Chan's formula, and writes the
//                     chunk's (mean − K, M2, count).
//                     In training with running statistics, the invocation that writes channel
//                     0's first chunk also increments num_batches_tracked (no dispatch of its own).
//   batch_norm_stats_serial   the same with one invocation per (channel, chunk) and no merge (CPU
//                     adapters: `ReduceSplit::Invocation`).
//   batch_norm_finalize       one workgroup per channel: Chan-merges the channel's chunk partials, updates
//                     the running statistics, writes the saved mean and invstd, and the
//                     channel's (K, mean − K, invstd·γ, β) for the normalize pass.
//   batch_norm_finalize_serial  the same with one invocation per channel (pairs with batch_norm_stats_serial).
//   batch_norm_finalize_eval  one invocation per channel (eval with running stats): mean and invstd
//                     from the running statistics. Changes nothing.
//   batch_norm_normalize      one invocation per p.run quads of 4 consecutive elements:
//                     y = (x − mean)·(invstd·γ) + β. With DROPOUT, BatchNorm then dropout in
//                     one pass, the same geometry: y = ((x − mean)·(invstd·γ) + β)·m with the
//                     mask of lib/philox.wgsl over flat element indices. With ALIGNED (S % 4 == 0
//                     and S ≥ 4·run), no walk across channel boundaries inside a quad, and the
//                     dropout draws three quads' masks per interleaved Philox step.
//
// Dispatches larger than 65535 workgroups are folded into y; every entry point recovers its
// linear workgroup index from `num_workgroups`.
// Binding ranges: an input larger than one storage binding is processed in ranges of whole samples
// (a channel is split across ranges). batch_norm_stats and the normalize pass run once per range with x
// and y bound at the range's offset; each stats chunk stores its own count with its partial, so
// batch_norm_finalize merges a channel's partials from every range; the dropout index is global.
// Precision: activations stored as the variant says (f32, f16, packed f16); f32 arithmetic.
// The variance is never formed as E[x²] − E[x]².
// Statistics are accumulated over x − K, with K = x[0, c, 0] a value of the channel itself, and
// the normalize pass computes ((x − K) − mean_K)·invstd. Off-centre data (1000 + 0.1·randn)
// then keeps the precision of its spread instead of losing it to the rounding of a mean near
// 1000: x − K is exact (Sterbenz) and mean_K is small.

// #include "lib/welford.wgsl"
// #include "lib/workgroup_reduce.wgsl"
// #include "lib/philox.wgsl"
// #include "lib/nchw.wgsl"
// #include "batch_norm/forward_params.wgsl"
// #vec4-variant

const WG: u32 = 256u;

// batch_norm_normalize's variants, set per pipeline (pipeline-overridable constants): the driver
// compiles each as a constant and drops the untaken side, which a CPU driver would otherwise
// execute under a lane mask for every quad.
override DROPOUT: bool = false;  // y ← y·m, the fused dropout's mask
override ALIGNED: bool = false;  // S % 4 == 0 and S ≥ 4·run: see normalize_run

const FLAG_AFFINE: u32 = 1u;         // read γ, β (otherwise γ = 1, β = 0)
const FLAG_TRACK: u32 = 2u;          // update running stats in batch_norm_finalize
const FLAG_CUMULATIVE: u32 = 4u;     // m = 1 / num_batches_tracked instead of momentum
const FLAG_COUNT: u32 = 8u;          // training with running stats: the stats pass increments num_batches_tracked

// The uniform's layout: batch_norm/forward_params.wgsl.

@group(0) @binding(0) var<uniform> p: Params;
// #activation @binding(1) read x (N, C, S)
// #activation @binding(2) read_write y (N, C, S)
@group(0) @binding(3) var<storage, read> weight: array<f32>;             // (C) γ
@group(0) @binding(4) var<storage, read> bias: array<f32>;               // (C) β
@group(0) @binding(5) var<storage, read_write> running_mean: array<f32>; // (C)
@group(0) @binding(6) var<storage, read_write> running_var: array<f32>;  // (C)
@group(0) @binding(7) var<storage, read_write> num_batches: array<u32>;  // (2) u64 as (lo, hi)
@group(0) @binding(8) var<storage, read_write> save_mean: array<f32>;    // (C)
@group(0) @binding(9) var<storage, read_write> save_invstd: array<f32>;  // (C)
@group(0) @binding(10) var<storage, read_write> partials: array<vec4<f32>>; // (C, parts) (mean − K, M2, count, 0), then (num_batches_tracked, 0, 0, 0)
@group(0) @binding(11) var<storage, read> rng_state: vec4<u32>;         // (seed lo, seed hi, offset lo, offset hi)
@group(0) @binding(12) var<storage, read_write> centre: array<vec4<f32>>; // (C) (K, mean − K, invstd·γ, β) for normalize

@compute @workgroup_size(256)
fn batch_norm_stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = wid.x + wid.y * nwg.x;
    if (w >= p.c * p.chunks) {
        return; // padding workgroup of a folded dispatch (uniform across the workgroup)
    }
    let c = w / p.chunks;
    let k = w % p.chunks;
    let shift = stats_shift(c);
    // Each invocation takes quads strided by 4·WG; the workgroup merges with Chan's formula.
    let begin = k * p.chunk_len;
    let mine = chunk_stat(c, begin + 4u * lid, min(begin + p.chunk_len, p.m), 4u * WG, shift);
    let total = workgroup_merge(lid, mine);
    if (lid == 0u) {
        publish_partial(c, k, shift, total);
    }
}

// batch_norm_stats with one invocation per (channel, chunk): no workgroup memory, no barriers. CPU
// adapters (see `ReduceSplit::Invocation`), where a workgroup merge costs more than the loads.
@compute @workgroup_size(256)
fn batch_norm_stats_serial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * WG;
    if (t >= p.c * p.chunks) {
        return;
    }
    let c = t / p.chunks;
    let k = t % p.chunks;
    let shift = stats_shift(c);
    let begin = k * p.chunk_len;
    publish_partial(c, k, shift, chunk_stat(c, begin, min(begin + p.chunk_len, p.m), 4u, shift));
}

// K of channel c: the first range reads x[0, c, 0] (and publishes it in centre[c].x for the
// later ranges, later dispatches, and batch_norm_finalize); later ranges read it back.
fn stats_shift(c: u32) -> f32 {
    if (p.first != 0u) {
        return ld_x(c * p.s);
    }
    return centre[c].x;
}

// Welford triple of x − K over channel-order indices start, start + stride, … (< end) of
// channel c, each the start of a quad of up to 4 consecutive elements (stride a multiple of 4),
// walking (n, s) by increments. A quad inside one sample is merged as one triple.
fn chunk_stat(c: u32, start: u32, end: u32, stride: u32, shift: f32) -> Stat {
    let step = walk_start(stride, p.s);
    var acc = Stat(0.0, 0.0, 0.0);
    var at = walk_start(start, p.s);
    for (var j = start; j < end; j += stride) {
        let i = walk_flat(at, c, p.s, p.c);
        if (VEC4) {
            // The host runs the statistics from the vec4 variant only when S % 4 == 0: every
            // quad then lies in one sample, starts on a vector, and ends by `end`.
            acc = chan_merge(acc, quad_stat(ld4a_x(i) - shift));
        } else if (quad_fits(at.s, p.s, j, end)) {
            acc = chan_merge(acc, quad_stat(ld4_x(i) - shift));
        } else {
            var e = at;
            for (var t = 0u; t < 4u && j + t < end; t++) {
                acc = welford_add(acc, ld_x(walk_flat(e, c, p.s, p.c)) - shift);
                e = walk_step(e, Walk(0u, 1u), p.s);
            }
        }
        at = walk_step(at, step, p.s);
    }
    return acc;
}

// Writes chunk k's triple (mean − K, M2, count) of channel c; the first range's chunk 0 also
// publishes K. With FLAG_COUNT (training with running statistics) the one invocation that
// writes channel 0's first chunk of the first range also increments num_batches_tracked: once
// per call, before batch_norm_finalize (the next dispatch) reads it for the cumulative average, as
// PyTorch increments before it averages. A dispatch of its own for that one increment cost
// about as much as a whole pass on a CPU driver.
fn publish_partial(c: u32, k: u32, shift: f32, total: Stat) {
    partials[c * p.parts + p.part_base + k] = vec4<f32>(total.mean, total.m2, total.n, 0.0);
    if (p.first != 0u && k == 0u) {
        centre[c] = vec4<f32>(shift, 0.0, 0.0, 0.0);
        if (c == 0u && (p.flags & FLAG_COUNT) != 0u) {
            count_batch();
        }
    }
}

@compute @workgroup_size(256)
fn batch_norm_finalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = wid.x + wid.y * nwg.x;
    if (c >= p.c) {
        return;
    }
    // Each invocation merges a strided subset of the channel's chunk partials, then the
    // workgroup merges; invocation 0 turns the triple into statistics.
    let total = workgroup_merge(lid, merge_partials(c, lid, WG));
    if (lid == 0u) {
        finish_channel(c, total);
    }
}

// batch_norm_finalize with one invocation per channel merging all its partials in order: no workgroup
// memory, no barriers. Pairs with batch_norm_stats_serial (CPU adapters).
@compute @workgroup_size(64)
fn batch_norm_finalize_serial(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= p.c) {
        return;
    }
    finish_channel(c, merge_partials(c, 0u, 1u));
}

// Chan merge of channel c's partials first, first + stride, … (< parts).
fn merge_partials(c: u32, first: u32, stride: u32) -> Stat {
    var acc = Stat(0.0, 0.0, 0.0);
    for (var k = first; k < p.parts; k += stride) {
        let part = partials[c * p.parts + k];
        acc = chan_merge(acc, Stat(part.z, part.x, part.y));
    }
    return acc;
}

// Saved mean and invstd, the normalize pass's coefficients, and the running statistics of
// channel c from its merged triple.
fn finish_channel(c: u32, total: Stat) {
    let shift = centre[c].x;
    let mean = shift + total.mean;
    let var_biased = max(total.m2 / f32(p.m_all), 0.0);
    let invstd = 1.0 / sqrt(var_biased + p.eps);
    save_mean[c] = mean;
    save_invstd[c] = invstd;
    centre[c] = coefficients(c, shift, total.mean, invstd);
    if ((p.flags & FLAG_TRACK) != 0u) {
        // num_batches_tracked was already incremented by the stats pass of this step, which
        // left its new value as an f32 in the partials' last slot (count_batch): reading it
        // there keeps this pass at 8 storage bindings, WebGPU's default limit.
        var m = p.momentum;
        if ((p.flags & FLAG_CUMULATIVE) != 0u) {
            m = 1.0 / partials[p.c * p.parts].x;
        }
        let var_unbiased = max(total.m2 / f32(p.m_all - 1u), 0.0);
        running_mean[c] = (1.0 - m) * running_mean[c] + m * mean;
        running_var[c] = (1.0 - m) * running_var[c] + m * var_unbiased;
    }
}

// Increments the 64-bit num_batches_tracked counter, held as (lo, hi) u32 words, and leaves the
// new count as an f32 in the slot after the partials (index C·parts) for batch_norm_finalize's
// cumulative average. One invocation of the stats pass calls it (publish_partial).
fn count_batch() {
    let lo = num_batches[0] + 1u;
    var hi = num_batches[1];
    if (lo == 0u) {
        hi += 1u;
        num_batches[1] = hi;
    }
    num_batches[0] = lo;
    partials[p.c * p.parts] = vec4<f32>(f32(lo) + f32(hi) * 4294967296.0, 0.0, 0.0, 0.0);
}

@compute @workgroup_size(64)
fn batch_norm_finalize_eval(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= p.c) {
        return;
    }
    let invstd = 1.0 / sqrt(running_var[c] + p.eps);
    save_mean[c] = running_mean[c];
    save_invstd[c] = invstd;
    centre[c] = coefficients(c, running_mean[c], 0.0, invstd);
}

// Normalized values of the four elements from `first` (lanes past the end are 0), `pos` its
// (channel, s) and `k` that channel's coefficients: one channel in the common case, per element
// where a channel boundary falls inside.
fn normalized4(first: u32, pos0: vec2<u32>, k0: vec4<f32>) -> vec4<f32> {
    if (quad_fits(pos0.y, p.s, first, p.total)) {
        return ((ld4a_x(first) - k0.x) - k0.y) * k0.z + k0.w;
    }
    var pos = pos0;
    var k = k0;
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u && first + j < p.total; j++) {
        if (j > 0u) {
            let next = next_position(pos, p.s, p.c);
            if (next.x != pos.x) {
                k = channel_coefficients(next.x);
            }
            pos = next;
        }
        v[j] = ((ld_x(first + j) - k.x) - k.y) * k.z + k.w;
    }
    return v;
}

@compute @workgroup_size(256)
fn batch_norm_normalize(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    var state = vec4<u32>(0u);
    if (DROPOUT) {
        state = load_state();
    }
    normalize_run(gid.x + gid.y * nwg.x * WG, state, DROPOUT, ALIGNED);
}

// Invocation g normalizes the p.run quads from element 4·run·g (the host's choice: 1 on GPUs,
// 8 on CPU adapters). Consecutive quads nearly always share a channel, so the channel index
// (two divisions) and its coefficients (a lane-by-lane load on a CPU driver, a tenth of
// `batch_norm_eval_forward` there when read per quad) are found once per run and again only where the
// run enters the next channel. `drop`: y ← y·m with the fused dropout's mask from generator
// state `state` (loaded once by the entry point); elem_base is a multiple of 4, so each quad
// is the four words of one Philox call.
// `aligned` (a constant): S % 4 == 0 and S ≥ 4·run, so every quad lies in
// one channel and a run enters at most one next channel, whose coefficients are read up front
// and taken by a select. The general walk below has a per-element path for quads that cross
// channels and re-finds the channel where a run crosses; a CPU driver executes both under a
// lane mask for every quad even when no lane needs them (lavapipe: the aligned path makes
// `batch_norm_dropout_forward` and `batch_norm_eval_forward` about 1.25x faster).
fn normalize_run(g: u32, state: vec4<u32>, drop: bool, aligned: bool) {
    var first = g * p.run * 4u;
    if (first >= p.total) {
        return;
    }
    var pos = channel_position(first, p.s, p.c, p.div_s, p.div_c);
    var k = channel_coefficients(pos.x);
    if (aligned) {
        var w = AlignedWalk(first, pos.y, k, k);
        if (p.run > 1u) {
            w.k_next = channel_coefficients(next_channel(pos.x, p.c));
        }
        if (!drop) {
            for (var r = 0u; r < p.run && w.first < p.total; r++) {
                aligned_quad(&w, vec4<f32>(1.0));
            }
            return;
        }
        // Three quads' masks per Philox step (dropout_factors4x3: one call is a chain of
        // dependent multiplies; three interleaved fill a CPU core's waits).
        // A run that is not a multiple of three draws the last step's spare words unused.
        for (var r = 0u; r < p.run && w.first < p.total; r += 3u) {
            let q = vec3<u32>((p.elem_base + w.first) / 4u) + vec3<u32>(0u, 1u, 2u);
            let m = dropout_factors4x3(state, q, p.drop_threshold, p.drop_flags, p.drop_scale);
            aligned_quad(&w, m.a);
            if (r + 1u < p.run && w.first < p.total) {
                aligned_quad(&w, m.b);
            }
            if (r + 2u < p.run && w.first < p.total) {
                aligned_quad(&w, m.c);
            }
        }
        return;
    }
    for (var r = 0u; r < p.run && first < p.total; r++) {
        var y = normalized4(first, pos, k);
        if (drop) {
            y *= dropout_factors4(state, (p.elem_base + first) / 4u, p.drop_threshold, p.drop_flags, p.drop_scale);
        }
        st4_y(first, y, p.total);
        first += 4u;
        pos.y += 4u;
        if (pos.y >= p.s && first < p.total) {
            pos = channel_position(first, p.s, p.c, p.div_s, p.div_c);
            k = channel_coefficients(pos.x);
        }
    }
}

// An aligned run's walk: the next quad's first element, its position s in the channel, the
// channel's coefficients and those of the next channel (taken once, where s reaches S).
struct AlignedWalk {
    first: u32,
    s: u32,
    k: vec4<f32>,
    k_next: vec4<f32>,
}

// Normalizes the walk's quad, multiplies it by `m` (the dropout factors, or ones: exact) and
// steps to the next quad. The one entry into the next channel: s passes S once (4·run ≤ S).
fn aligned_quad(w: ptr<function, AlignedWalk>, m: vec4<f32>) {
    let k = (*w).k;
    let y = ((ld4a_x((*w).first) - k.x) - k.y) * k.z + k.w;
    st4_y((*w).first, y * m, p.total);
    (*w).first += 4u;
    (*w).s += 4u;
    (*w).k = select(k, (*w).k_next, (*w).s == p.s);
}

// (K, mean − K, invstd·γ, β) of channel c, which the finalize passes store in centre[c] so that
// normalize reads them with one load. Normalizing is ((x − K) − (mean − K))·(invstd·γ) + β: the
// subtractions come first, since for off-centre inputs x·scale − mean·scale would cancel
// catastrophically.
fn coefficients(c: u32, k: f32, mean_k: f32, invstd: f32) -> vec4<f32> {
    var scale = invstd;
    var beta = 0.0;
    if ((p.flags & FLAG_AFFINE) != 0u) {
        scale *= weight[c];
        beta = bias[c];
    }
    return vec4<f32>(k, mean_k, scale, beta);
}

fn channel_coefficients(c: u32) -> vec4<f32> {
    return centre[c];
}
