// include-only: validated as part of the shaders that include it.
// What the BatchNorm backward's passes share (batch_norm/backward.wgsl, the GPU passes;
// cpu/batch_norm/backward_serial.wgsl, the reduce and finalize with one invocation per chunk
// and per channel): the uniform, the bindings, the override flags, K, dy (× the mask), a chunk's
// three sums, the partials and the per-channel finish (dγ, dβ and the dx coefficients).

// #include "lib/philox.wgsl"
// #include "lib/nchw.wgsl"
// #include "batch_norm/backward_params.wgsl"

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
        // GroupNorm runs the reduce on (1, N·C, S) views, each (n, c) centred on its group's mean.
        return save_mean[(p.chan_base + c) / p.group_chans];
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

// The reduce's centre K: centre_of, or with `eval` the running mean batch_norm_backward_eval_coef put in coef.
fn reduce_centre(c: u32, eval: bool) -> f32 {
    if (eval) {
        return coef[c].x;
    }
    return centre_of(c);
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

// γ·invstd of channel c (invstd without affine): dx's factor on g.
fn dx_scale(c: u32) -> f32 {
    var a = save_invstd[c];
    if (has(FLAG_AFFINE)) {
        a *= weight[c];
    }
    return a;
}
