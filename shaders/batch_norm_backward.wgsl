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
// Entry points, in order:
//   bnb_reduce    one workgroup per (channel, chunk): the three sums of the chunk.
//   bnb_finalize  one workgroup per channel: merges chunk sums; writes (or adds to) dγ, dβ;
//                 writes the channel's dx coefficients (K, mean − K, Σdy/M, Σdy·x̂/M).
//   bnb_dx        one invocation per 4 consecutive elements: dx (written or added to).

// #include "philox.wgsl"

const WG: u32 = 256u;

const FLAG_AFFINE: u32 = 1u;        // γ multiplies dx; dγ, dβ are produced
const FLAG_BATCH_STATS: u32 = 2u;   // the forward used batch statistics
const FLAG_ACCUM_DX: u32 = 4u;      // dx += instead of dx =
const FLAG_ACCUM_PARAMS: u32 = 8u;  // dγ += and dβ += instead of =
const FLAG_DROPOUT: u32 = 16u;      // dy ← dy·m (fused dropout)

// Mirrors `BnBackwardParams` in src/kernels/batch_norm_backward.rs.
struct Params {
    n: u32,
    c: u32,
    s: u32,
    m: u32,
    chunk_len: u32,
    chunks: u32,
    flags: u32,
    total: u32,
    drop_threshold: u32,
    drop_flags: u32,
    drop_scale: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;                   // (N, C, S)
@group(0) @binding(2) var<storage, read> dy: array<f32>;                  // (N, C, S)
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;            // (N, C, S)
@group(0) @binding(4) var<storage, read> weight: array<f32>;              // (C) γ
@group(0) @binding(5) var<storage, read> save_mean: array<f32>;           // (C)
@group(0) @binding(6) var<storage, read> save_invstd: array<f32>;         // (C)
@group(0) @binding(7) var<storage, read_write> partials: array<vec4<f32>>; // (C, chunks) (Σ(x−K), Σdy, Σdy(x−K), 0)
@group(0) @binding(8) var<storage, read_write> coef: array<vec4<f32>>;     // (C) (K, mean−K, Σdy/M, Σdy·x̂/M)
@group(0) @binding(9) var<storage, read_write> dweight: array<f32>;       // (C) dγ
@group(0) @binding(10) var<storage, read_write> dbias: array<f32>;        // (C) dβ
@group(0) @binding(11) var<storage, read> rng_state: array<u32>;          // (4) seed lo/hi, offset lo/hi

var<workgroup> shared_sums: array<vec3<f32>, WG>;

fn has(flag: u32) -> bool {
    return (p.flags & flag) != 0u;
}

// The value sums are centred on: a value of the channel (batch stats) or the running mean.
fn centre_of(c: u32) -> f32 {
    if (has(FLAG_BATCH_STATS)) {
        return x[c * p.s];
    }
    return save_mean[c];
}

// dy of element i, times the fused dropout's mask factor when there is one.
fn upstream(i: u32) -> f32 {
    if (!has(FLAG_DROPOUT)) {
        return dy[i];
    }
    let state = vec4<u32>(rng_state[0], rng_state[1], rng_state[2], rng_state[3]);
    let words = dropout_words(state, i / 4u);
    return dy[i] * select(0.0, p.drop_scale, dropout_keep(words[i % 4u], p.drop_threshold, p.drop_flags));
}

fn workgroup_sum3(lid: u32, mine: vec3<f32>) -> vec3<f32> {
    // Two levels (16 × 16) rather than an 8-deep tree: fewer barriers, which CPU drivers pay
    // dearly for. Requires WG = 256.
    shared_sums[lid] = mine;
    workgroupBarrier();
    if (lid < 16u) {
        var acc = vec3<f32>(0.0);
        for (var k = 0u; k < 16u; k++) {
            acc += shared_sums[lid * 16u + k];
        }
        shared_sums[lid * 16u] = acc;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var acc = vec3<f32>(0.0);
        for (var k = 0u; k < 16u; k++) {
            acc += shared_sums[k * 16u];
        }
        shared_sums[0] = acc;
    }
    workgroupBarrier();
    let total = shared_sums[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn bnb_reduce(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = wid.x + wid.y * nwg.x;
    if (w >= p.c * p.chunks) {
        return;
    }
    let c = w / p.chunks;
    let k = w % p.chunks;
    let begin = k * p.chunk_len;
    let end = min(begin + p.chunk_len, p.m);
    let centre = centre_of(c);

    // Phase 1: this invocation's share of Σ(x − K), Σdy, Σdy·(x − K).
    var acc = vec3<f32>(0.0);
    for (var j = begin + lid; j < end; j += WG) {
        let n = j / p.s;
        let i = (n * p.c + c) * p.s + (j - n * p.s);
        let xs = x[i] - centre;
        let g = upstream(i);
        acc += vec3<f32>(xs, g, g * xs);
    }

    // Phase 2: tree sum across the workgroup.
    let total = workgroup_sum3(lid, acc);
    if (lid == 0u) {
        partials[w] = vec4<f32>(total, 0.0);
    }
}

@compute @workgroup_size(256)
fn bnb_finalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = wid.x + wid.y * nwg.x;
    if (c >= p.c) {
        return;
    }
    var acc = vec3<f32>(0.0);
    for (var k = lid; k < p.chunks; k += WG) {
        acc += partials[c * p.chunks + k].xyz;
    }
    let total = workgroup_sum3(lid, acc);
    if (lid == 0u) {
        let m = f32(p.m);
        let invstd = save_invstd[c];
        // mean − K: exact from the data with batch statistics; K is the mean otherwise.
        let mk = select(0.0, total.x / m, has(FLAG_BATCH_STATS));
        let sum_dy = total.y;
        let sum_dy_xhat = invstd * (total.z - mk * sum_dy);
        if (has(FLAG_AFFINE)) {
            let accumulate = has(FLAG_ACCUM_PARAMS);
            dweight[c] = select(0.0, dweight[c], accumulate) + sum_dy_xhat;
            dbias[c] = select(0.0, dbias[c], accumulate) + sum_dy;
        }
        coef[c] = vec4<f32>(centre_of(c), mk, sum_dy / m, sum_dy_xhat / m);
    }
}

@compute @workgroup_size(256)
fn bnb_dx(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = gid.x + gid.y * nwg.x * WG;
    let first = g * 4u;
    if (first >= p.total) {
        return;
    }
    for (var k = 0u; k < 4u; k++) {
        let i = first + k;
        if (i >= p.total) {
            break;
        }
        let c = (i / p.s) % p.c;
        let cf = coef[c];
        let invstd = save_invstd[c];
        var a = invstd;
        if (has(FLAG_AFFINE)) {
            a *= weight[c];
        }
        var v = upstream(i);
        if (has(FLAG_BATCH_STATS)) {
            let xhat = ((x[i] - cf.x) - cf.y) * invstd;
            v = v - cf.z - xhat * cf.w;
        }
        dx[i] = select(0.0, dx[i], has(FLAG_ACCUM_DX)) + a * v;
    }
}
