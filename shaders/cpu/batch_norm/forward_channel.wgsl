// BatchNorm training forward in one pass per channel, for CPU adapters with SUBGROUP
// (lavapipe): in place of batch_norm/forward.wgsl's batch_norm_stats → batch_norm_finalize → batch_norm_normalize
// where the plan allows (one range, S % 4 == 0, f32 bound as vectors, a momentum, i.e. not the
// cumulative average; BatchNormPlanOptions::channel_pass), with the same uniform, bindings,
// results within rounding and, fused with dropout, the same mask.
//
//   batch_norm_channel_forward   y = BN(x) with batch statistics (with DROPOUT: y = BN(x)·m); saved
//                        mean and invstd, running statistics, num_batches_tracked as the three
//                        passes
//
// Why: on a CPU driver each dispatch costs a fixed ~50 µs, and the three passes' partials and
// coefficients go through memory lane by lane. Here a workgroup is one
// subgroup of 8 invocations (taken only where the adapter's smallest subgroup has 8 lanes or
// more) that owns channel c: it reduces the channel (lane ℓ takes quads ℓ, ℓ + 8, … of every
// sample's plane; Welford/Chan per lane, a butterfly of shuffles across lanes), turns the
// triple into statistics, and normalizes the channel, whose second read finds it in the core's
// cache for the sizes where this pays. One dispatch of C workgroups.
// Precision: as batch_norm/forward.wgsl: statistics of x − K with K = x[0, c, 0], Chan merges, never
// E[x²] − E[x]²; y = ((x − K) − (mean − K))·(invstd·γ) + β.

// #include "lib/welford.wgsl"
// #include "lib/philox.wgsl"
// #include "batch_norm/forward_params.wgsl"
// #vec4-variant

const WG: u32 = 8u;
const LANES: u32 = 8u;

const FLAG_AFFINE: u32 = 1u;
const FLAG_TRACK: u32 = 2u;
const FLAG_COUNT: u32 = 8u;

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
@group(0) @binding(11) var<storage, read> rng_state: vec4<u32>;         // (seed lo, seed hi, offset lo, offset hi)

// Set per pipeline (a pipeline-overridable constant, folded by the driver).
override DROPOUT: bool = false;  // y ← y·m, the fused dropout's mask

@compute @workgroup_size(8)
fn batch_norm_channel_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    var state = vec4<u32>(0u);
    if (DROPOUT) {
        state = load_state();
    }
    channel_forward(wid.x + wid.y * nwg.x, lid, state, DROPOUT);
}

// The subgroup's triples merged by a butterfly of shuffles; lane 0's total is the result (every
// lane's equals it up to the rounding of its merge order, so the caller takes lane 0's).
fn subgroup_merge(mine: Stat) -> Stat {
    var acc = mine;
    for (var d = 1u; d < LANES; d <<= 1u) {
        let other = Stat(subgroupShuffleXor(acc.n, d), subgroupShuffleXor(acc.mean, d), subgroupShuffleXor(acc.m2, d));
        acc = chan_merge(acc, other);
    }
    return Stat(subgroupBroadcast(acc.n, 0u), subgroupBroadcast(acc.mean, 0u), subgroupBroadcast(acc.m2, 0u));
}

// Increments the 64-bit num_batches_tracked held as (lo, hi) u32 words (batch_norm/forward.wgsl's
// count_batch, without the cumulative average's copy: this pass never runs with it).
fn count_batch() {
    let lo = num_batches[0] + 1u;
    if (lo == 0u) {
        num_batches[1] += 1u;
    }
    num_batches[0] = lo;
}

// Channel c by one subgroup, lane `lane`; y ← y·m with `drop` (a literal) and the generator
// state the dropout entry point loaded (only it binds rng_state).
fn channel_forward(c: u32, lane: u32, state: vec4<u32>, drop: bool) {
    if (c >= p.c) {
        return; // padding workgroup of a folded dispatch (the whole subgroup)
    }
    let plane = p.s >> 2u; // quads per sample's plane of channel c
    let shift = ld_x(c * p.s);
    var acc = Stat(0.0, 0.0, 0.0);
    for (var n = 0u; n < p.n; n++) {
        let base = (n * p.c + c) * p.s;
        for (var j = lane; j < plane; j += LANES) {
            acc = chan_merge(acc, quad_stat(ld4a_x(base + 4u * j) - shift));
        }
    }
    let total = subgroup_merge(acc);
    let mean_k = total.mean;
    let invstd = 1.0 / sqrt(max(total.m2 / f32(p.m_all), 0.0) + p.eps);
    var scale = invstd;
    var beta = 0.0;
    if ((p.flags & FLAG_AFFINE) != 0u) {
        scale *= weight[c];
        beta = bias[c];
    }
    if (lane == 0u) {
        let mean = shift + mean_k;
        save_mean[c] = mean;
        save_invstd[c] = invstd;
        if ((p.flags & FLAG_TRACK) != 0u) {
            let m = p.momentum;
            let var_unbiased = max(total.m2 / f32(p.m_all - 1u), 0.0);
            running_mean[c] = (1.0 - m) * running_mean[c] + m * mean;
            running_var[c] = (1.0 - m) * running_var[c] + m * var_unbiased;
        }
        if (c == 0u && (p.flags & FLAG_COUNT) != 0u) {
            count_batch();
        }
    }
    // Normalize the channel: three quads j, j + 8, j + 16 per step, their masks from three
    // interleaved Philox calls with `drop`.
    for (var n = 0u; n < p.n; n++) {
        let base = (n * p.c + c) * p.s;
        for (var j = lane; j < plane; j += 3u * LANES) {
            var m = Factors3(vec4<f32>(1.0), vec4<f32>(1.0), vec4<f32>(1.0));
            if (drop) {
                let q = vec3<u32>((p.elem_base + base) / 4u + j) + vec3<u32>(0u, LANES, 2u * LANES);
                m = dropout_factors4x3(state, q, p.drop_threshold, p.drop_flags, p.drop_scale);
            }
            normalize_quad(base, j, plane, shift, mean_k, scale, beta, m.a);
            normalize_quad(base, j + LANES, plane, shift, mean_k, scale, beta, m.b);
            normalize_quad(base, j + 2u * LANES, plane, shift, mean_k, scale, beta, m.c);
        }
    }
}

// y of quad j of the plane from element `base` (nothing past the plane), times m.
fn normalize_quad(base: u32, j: u32, plane: u32, shift: f32, mean_k: f32, scale: f32, beta: f32, m: vec4<f32>) {
    if (j < plane) {
        let e = base + 4u * j;
        st4_y(e, (((ld4a_x(e) - shift) - mean_k) * scale + beta) * m, e + 4u);
    }
}
