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

// #include "lib/workgroup_reduce.wgsl"
// #include "lib/philox.wgsl"
// #include "lib/nchw.wgsl"
// #include "batch_norm/forward_common.wgsl"
// #vec4-variant

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

// SyncBatchNorm's split of a training step (statistics over every rank's slice; the host
// all-reduces between the passes):
//   batch_norm_export          one workgroup per channel, after batch_norm_stats: the channel's
//                      merged (K, mean − K, M2, count) into centre[c], which the host reads back.
//   batch_norm_count           one invocation: num_batches_tracked += 1 (the stats pass of a
//                      split step does not count, so that a step refused after the all-reduce
//                      changes nothing).
//   batch_norm_finalize_merged one invocation per channel, after the host wrote the merged
//                      (K, mean − K, M2, count) of every rank into centre[c] (K the local one)
//                      and (mean, 0, 0, 0) into centre[C + c]: batch_norm_finalize's work with
//                      the global count, saving and tracking the same f32 mean on every rank
//                      (K + (mean − K) would round differently per rank).
@compute @workgroup_size(256)
fn batch_norm_export(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = wid.x + wid.y * nwg.x;
    if (c >= p.c) {
        return;
    }
    let total = workgroup_merge(lid, merge_partials(c, lid, WG));
    if (lid == 0u) {
        centre[c] = vec4<f32>(centre[c].x, total.mean, total.m2, total.n);
    }
}

@compute @workgroup_size(1)
fn batch_norm_count() {
    if ((p.flags & FLAG_COUNT) != 0u) {
        count_batch();
    }
}

@compute @workgroup_size(64)
fn batch_norm_finalize_merged(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let c = gid.x + gid.y * nwg.x * 64u;
    if (c >= p.c) {
        return;
    }
    let merged = centre[c];
    let mean = centre[p.c + c].x;
    finish_channel_of(c, Stat(merged.w, merged.y, merged.z), merged.w, merged.w - 1.0, mean);
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

fn channel_coefficients(c: u32) -> vec4<f32> {
    return centre[p.chan_base + c];
}
