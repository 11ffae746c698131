// include-only: validated as part of the shaders that include it.
// What the BatchNorm forward's passes share (batch_norm/forward.wgsl, the GPU passes;
// cpu/batch_norm/forward_serial.wgsl, the reductions with one invocation per chunk): the uniform,
// the bindings, the override flags, K, a chunk's Welford triple, the partials and the per-channel
// finish (statistics, running statistics, coefficients).

// #include "lib/welford.wgsl"
// #include "lib/nchw.wgsl"
// #include "batch_norm/forward_params.wgsl"

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
@group(0) @binding(10) var<storage, read_write> partials: array<vec4<f32>>; // (C, parts) (mean − K, M2, count, K), then (num_batches_tracked, 0, 0, 0)
@group(0) @binding(11) var<storage, read> rng_state: vec4<u32>;         // (seed lo, seed hi, offset lo, offset hi)
@group(0) @binding(12) var<storage, read_write> centre: array<vec4<f32>>; // (C) (K, mean − K, invstd·γ, β) for normalize

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

// Writes chunk k's triple (mean − K, M2, count) of channel c, and K (GroupNorm's finalize reads
// it there: group_norm/forward.wgsl); the first range's chunk 0 also publishes K in centre. With FLAG_COUNT (training with running statistics) the one invocation that
// writes channel 0's first chunk of the first range also increments num_batches_tracked: once
// per call, before batch_norm_finalize (the next dispatch) reads it for the cumulative average, as
// PyTorch increments before it averages. A dispatch of its own for that one increment cost
// about as much as a whole pass on a CPU driver.
fn publish_partial(c: u32, k: u32, shift: f32, total: Stat) {
    partials[c * p.parts + p.part_base + k] = vec4<f32>(total.mean, total.m2, total.n, shift);
    if (p.first != 0u && k == 0u) {
        centre[c] = vec4<f32>(shift, 0.0, 0.0, 0.0);
        if (c == 0u && (p.flags & FLAG_COUNT) != 0u) {
            count_batch();
        }
    }
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
    finish_channel_of(c, total, f32(p.m_all), f32(p.m_all - 1u), centre[c].x + total.mean);
}

// finish_channel over `count` elements per channel (SyncBatchNorm: the count over every rank;
// `count_less_one` exact where the count is an integer; `mean` the saved and tracked mean,
// K + (mean − K) here, the same value on every rank there).
fn finish_channel_of(c: u32, total: Stat, count: f32, count_less_one: f32, mean: f32) {
    let shift = centre[c].x;
    let var_biased = max(total.m2 / count, 0.0);
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
        let var_unbiased = max(total.m2 / count_less_one, 0.0);
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
