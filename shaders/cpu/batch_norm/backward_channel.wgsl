// BatchNorm backward with batch statistics in one pass per channel, for CPU adapters with
// SUBGROUP (lavapipe): in place of batch_norm/backward.wgsl's batch_norm_backward_reduce → batch_norm_backward_finalize →
// batch_norm_backward_dx where the plan allows (one range, S % 4 == 0, f32 bound as vectors;
// BatchNormBackwardPlanOptions::channel_pass), with the same uniform, bindings, formulas and,
// fused with dropout, the same mask.
//
//   batch_norm_backward_channel   dx written or added to (ACCUMULATE); dγ, dβ written or added to
//                 (FLAG_ACCUM_PARAMS); with DROPOUT dy·m
//
// Why: as cpu/batch_norm/forward_channel.wgsl for the forward: one dispatch instead of three on a driver
// where each costs ~50 µs, no partials or coefficients through memory. A workgroup is one
// subgroup of 8 invocations (taken only where the adapter's smallest subgroup has 8 lanes or
// more) that owns channel c: it sums Σ(x − K), Σg, Σg·(x − K) over the channel (g = dy·m; lane ℓ
// takes quads ℓ, ℓ + 8, … of every sample's plane, three per step so that three Philox calls
// interleave), adds them across lanes with subgroupAdd, writes dγ and dβ, and walks the channel
// again for dx = a·g + q + r·(x − K) (batch_norm/backward.wgsl's finish_channel). Writing dx
// with dropout, the first walk parks g in dx and the second reads it back (the mask drawn once,
// as batch_norm_backward_reduce with PARK does); adding to dx, the second walk draws it again.
// Precision: sums around K = x[0, c, 0]; mean − K recomputed exactly from Σ(x − K).

// #include "lib/philox.wgsl"
// #include "batch_norm/backward_params.wgsl"
// #vec4-variant

const LANES: u32 = 8u;

const FLAG_AFFINE: u32 = 1u;
const FLAG_ACCUM_PARAMS: u32 = 8u;

// The uniform's layout: batch_norm/backward_params.wgsl.

@group(0) @binding(0) var<uniform> p: Params;
// #activation @binding(1) read x (N, C, S)
// #activation @binding(2) read dy (N, C, S)
// #activation @binding(3) read_write dx (N, C, S)
@group(0) @binding(4) var<storage, read> weight: array<f32>;              // (C) γ
@group(0) @binding(6) var<storage, read> save_invstd: array<f32>;         // (C)
@group(0) @binding(9) var<storage, read_write> dweight: array<f32>;       // (C) dγ
@group(0) @binding(10) var<storage, read_write> dbias: array<f32>;        // (C) dβ
@group(0) @binding(11) var<storage, read> rng_state: vec4<u32>;          // (seed lo, seed hi, offset lo, offset hi)

// Variants, set per pipeline (pipeline-overridable constants, folded by the driver).
override DROPOUT: bool = false;     // dy times the fused dropout's regenerated mask
override ACCUMULATE: bool = false;  // dx += instead of dx =

@compute @workgroup_size(8)
fn batch_norm_backward_channel(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    var state = vec4<u32>(0u);
    if (DROPOUT) {
        state = load_state();
    }
    channel_backward(wid.x + wid.y * nwg.x, lid, state, DROPOUT, ACCUMULATE);
}

// Mask factors of the plane quads j, j + 8, j + 16 from element `base` (ones without `drop`).
fn step_masks(state: vec4<u32>, base: u32, j: u32, drop: bool) -> Factors3 {
    if (!drop) {
        return Factors3(vec4<f32>(1.0), vec4<f32>(1.0), vec4<f32>(1.0));
    }
    let q = vec3<u32>((p.elem_base + base) / 4u + j) + vec3<u32>(0u, LANES, 2u * LANES);
    return dropout_factors4x3(state, q, p.drop_threshold, p.drop_flags, p.drop_scale);
}

// (Σ(x − K), Σg, Σg·(x − K)) of plane quad j from element `base`, g = dy·m (zeros past the
// plane); with `park`, g written to dx.
fn quad_sums(base: u32, j: u32, plane: u32, shift: f32, m: vec4<f32>, park: bool) -> vec3<f32> {
    if (j >= plane) {
        return vec3<f32>(0.0);
    }
    let e = base + 4u * j;
    let xs = ld4a_x(e) - shift;
    let g = ld4a_dy(e) * m;
    if (park) {
        st4_dx(e, g, e + 4u);
    }
    return vec3<f32>(dot(xs, vec4<f32>(1.0)), dot(g, vec4<f32>(1.0)), dot(g, xs));
}

// dx of plane quad j (nothing past the plane) from coefficients k = (K, a, q, r): a·g + q +
// r·(x − K), g = dy·m or, `parked`, read back from dx; added to dx with `accumulate`.
fn quad_dx(base: u32, j: u32, plane: u32, k: vec4<f32>, m: vec4<f32>, parked: bool, accumulate: bool) {
    if (j >= plane) {
        return;
    }
    let e = base + 4u * j;
    var g: vec4<f32>;
    if (parked) {
        g = ld4a_dx(e);
    } else {
        g = ld4a_dy(e) * m;
    }
    var out = k.y * g + k.z + k.w * (ld4a_x(e) - k.x);
    if (accumulate) {
        out += ld4a_dx(e);
    }
    st4_dx(e, out, e + 4u);
}

// Channel c by one subgroup, lane `lane`; `drop`, `accumulate` literals of the entry point,
// `state` the generator state the dropout entry points loaded.
fn channel_backward(c: u32, lane: u32, state: vec4<u32>, drop: bool, accumulate: bool) {
    if (c >= p.c) {
        return; // padding workgroup of a folded dispatch (the whole subgroup)
    }
    let park = drop && !accumulate;
    let plane = p.s >> 2u;
    let shift = ld_x(c * p.s);
    var sums = vec3<f32>(0.0);
    for (var n = 0u; n < p.n; n++) {
        let base = (n * p.c + c) * p.s;
        for (var j = lane; j < plane; j += 3u * LANES) {
            let m = step_masks(state, base, j, drop);
            sums += quad_sums(base, j, plane, shift, m.a, park) + quad_sums(base, j + LANES, plane, shift, m.b, park)
                + quad_sums(base, j + 2u * LANES, plane, shift, m.c, park);
        }
    }
    let total = subgroupAdd(sums);
    // batch_norm/backward.wgsl's finish_channel with batch statistics.
    let m_all = f32(p.m_all);
    let invstd = save_invstd[c];
    let mk = total.x / m_all;
    let sum_dy = total.y;
    let sum_dy_xhat = invstd * (total.z - mk * sum_dy);
    var a = invstd;
    if ((p.flags & FLAG_AFFINE) != 0u) {
        a *= weight[c];
        if (lane == 0u) {
            let acc = (p.flags & FLAG_ACCUM_PARAMS) != 0u;
            dweight[c] = select(0.0, dweight[c], acc) + sum_dy_xhat;
            dbias[c] = select(0.0, dbias[c], acc) + sum_dy;
        }
    }
    let r = -a * invstd * (sum_dy_xhat / m_all);
    let k = vec4<f32>(shift, a, -a * (sum_dy / m_all) - r * mk, r);
    for (var n = 0u; n < p.n; n++) {
        let base = (n * p.c + c) * p.s;
        for (var j = lane; j < plane; j += 3u * LANES) {
            let m = step_masks(state, base, j, drop && !park);
            quad_dx(base, j, plane, k, m.a, park, accumulate);
            quad_dx(base, j + LANES, plane, k, m.b, park, accumulate);
            quad_dx(base, j + 2u * LANES, plane, k, m.c, park, accumulate);
        }
    }
}
