// Dropout and Dropout2d, reproducible on every device (mask spec in lib/philox.wgsl).
//
//   train:  y_i = x_i · m_i,   m_i = scale if keep(unit(i)) else 0
//           scale = 1/(1 − p) (inverted, PyTorch's) or 1 (scale-at-inference)
//   eval:   y_i = x_i · scale  with every unit kept: scale = 1 (inverted) or 1 − p
//   backward: the same map applied to dy (dropout is linear for a fixed mask), with the
//           forward's (seed, offset); adding (y += instead of y =) when accumulating.
//   unit(i) = i for Dropout; the (n·C + c) channel of element i for Dropout2d (i / S).
// The product x·m (not a select) propagates NaN/Inf from dropped elements, as PyTorch does.
//
// Entry points:
//   dropout_forward   one invocation per three quads of 4 consecutive elements, quads g, g + t,
//                     g + 2t (t invocations): one Philox call serves a quad, the three
//                     interleaved. dropout2d_forward: one invocation per four quads g, g + t,
//                     g + 2t, g + 3t (two calls per quad: its elements' channels lie within
//                     eight consecutive units). With ACCUMULATE: y += instead of y =.
//   dropout2d_from_bits  Dropout2d (unit_len >= 4) from the channel keep bits dropout_mask
//                     wrote into the plan's scratch just before: four quads per invocation as
//                     dropout2d_forward, one word load per quad instead of two Philox calls.
//                     With ACCUMULATE: y +=.
//   dropout_apply_mask  one invocation per element: y = x·m with m read from a packed mask
//                     (the backward from a stored mask: dx = dy·m).
//   dropout_mask      one invocation per mask word: the packed keep bits of 32 units, unit u
//                     in bit u % 32 of word u / 32 (LSB first); bits past the last unit are 0.
//   dropout_rng_advance       one invocation: offset += 1 in the generator state (64-bit carry), so
//                     consecutive calls recorded in one submission draw fresh masks.
// Dispatches over 65535 workgroups fold into y. A tensor larger than one storage binding is
// processed in binding ranges: x and y are bound at the range's offset and `base` is the flat index of
// its first element, so the mask is the single-binding one. Precision: activations are stored as the
// variant says (f32, f16, packed f16; see the #activation lines), arithmetic is f32. The vec4
// variant (f32 as array<vec4<f32>>) runs ranges bound as whole 16-byte vectors.

// #include "lib/philox.wgsl"
// #include "lib/nchw.wgsl"
// #vec4-variant

const WG: u32 = 256u;
const FLAG_ACCUMULATE: u32 = 2u;   // flags: add to y instead of overwriting it (dropout_apply_mask)

// The forward passes' variant, set per pipeline (a pipeline-overridable constant): the driver
// compiles it as a constant and drops the untaken side, which a CPU driver would otherwise
// execute under a lane mask for every quad.
override ACCUMULATE: bool = false;  // y += instead of y =

// Mirrors `DropoutParams` in src/kernels/dropout.rs.
struct Params {
    numel: u32,      // elements of x and y
    unit_len: u32,   // elements per mask unit: 1 (Dropout) or S = ∏ spatial (Dropout2d)
    units: u32,      // mask units: numel, or N·C
    threshold: u32,  // keep iff word >= threshold
    flags: u32,      // DROP_ALL (p = 1 in training), FLAG_ACCUMULATE
    scale: f32,      // multiplier of kept elements
    base: u32,       // flat index of element 0 of this dispatch (calls split over bindings; multiple of 4)
    _pad1: u32,
    div_unit: vec2<u32>, // multiply-shift pair of unit_len (fast_div in lib/nchw.wgsl)
    _pad2: vec2<u32>,
}

@group(0) @binding(0) var<uniform> p: Params;
// #activation @binding(1) read x (numel)
// #activation @binding(2) read_write y (numel)
@group(0) @binding(3) var<storage, read_write> rng_state: vec4<u32>; // (seed lo, seed hi, offset lo, offset hi)
@group(0) @binding(4) var<storage, read_write> mask: array<u32>;     // (⌈units/32⌉) packed bits

// Writes (or, with FLAG_ACCUMULATE, adds) one output element. Written values are x·m exactly (a
// dropped negative value stays −0, as in PyTorch), never 0 + x·m.
fn emit(i: u32, v: f32) {
    var y = v;
    if ((p.flags & FLAG_ACCUMULATE) != 0u) {
        y += ld_y(i);
    }
    st_y(i, y);
}

fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

// One entry point per mask unit (Dropout, Dropout2d), so that each runs only its own code:
// CPU drivers such as lavapipe execute both sides of every `if` (predication), so a uniform
// flag choosing between them would make every call pay for both.
@compute @workgroup_size(256)
fn dropout_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    forward_elements(linear_id(gid, nwg), ACCUMULATE);
}

@compute @workgroup_size(256)
fn dropout2d_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    forward_channels(linear_id(gid, nwg), ACCUMULATE);
}

// Dropout, invocation g: quads (4 consecutive elements) g, g + t and g + 2t of this dispatch,
// t = ⌈quads / 3⌉ (the host dispatches t invocations). base is a multiple of 4, so a quad's
// four elements are the four words of one Philox call; the three calls run round by round
// together (dropout_factors4x3): one call is a chain of dependent multiplies that leaves a CPU
// core waiting (lavapipe: dropout 1.45-1.6x faster than one quad per invocation). Strided by t rather than consecutive, so that neighbouring invocations still
// read neighbouring quads (GPUs coalesce those accesses). `accumulate`: y += instead of y =.
fn forward_elements(g: u32, accumulate: bool) {
    let quads = (p.numel + 3u) / 4u;
    let t = (quads + 2u) / 3u;
    if (g >= t) {
        return;
    }
    let q = vec3<u32>(g, g + t, g + 2u * t);
    let m = dropout_factors4x3(load_state(), vec3<u32>(p.base / 4u) + q, p.threshold, p.flags, p.scale);
    apply4(4u * q.x, m.a, accumulate);
    if (q.y < quads) {
        apply4(4u * q.y, m.b, accumulate);
    }
    if (q.z < quads) {
        apply4(4u * q.z, m.c, accumulate);
    }
}

// Dropout2d's element passes: invocation g takes quads g, g + t, g + 2t and g + 3t of this
// dispatch, t = ⌈quads / 4⌉ (the host dispatches t invocations): a CPU driver pays a fixed cost
// per invocation that one quad does not amortise (as the copy yardstick's grains show). Strided
// by t, so that neighbouring invocations still touch neighbouring quads (GPUs coalesce those).
// Returns (quads, t); g takes part when g < t, and its quad g + k·t exists when below quads.
fn channel_grid() -> vec2<u32> {
    let quads = (p.numel + 3u) / 4u;
    return vec2<u32>(quads, (quads + 3u) / 4u);
}

// Dropout2d, invocation g: its quads (channel_grid) of this dispatch (units of unit_len
// elements), each decided by channel_keep; `accumulate`: y += instead of y =.
fn forward_channels(g: u32, accumulate: bool) {
    let grid = channel_grid();
    if (g >= grid.y) {
        return;
    }
    let state = load_state();
    for (var k = 0u; k < 4u; k++) {
        let first = 4u * (g + k * grid.y);
        if (first < p.numel) {
            let m = select(vec4<f32>(0.0), vec4<f32>(p.scale), channel_keep(state, p.base + first));
            apply4(first, m, accumulate);
        }
    }
}

// y = x·m (or y += x·m) for the four elements from `first`. The vec4 variant runs only where
// numel % 4 == 0: every quad is whole there.
fn apply4(first: u32, m: vec4<f32>, accumulate: bool) {
    var v: vec4<f32>;
    if (VEC4 || first + 3u < p.numel) {
        v = ld4a_x(first) * m;
        if (accumulate) {
            v += ld4a_y(first);
        }
    } else {
        for (var k = 0u; k < 4u; k++) {
            let i = first + k;
            if (i < p.numel) {
                v[k] = ld_x(i) * m[k];
                if (accumulate) {
                    v[k] += ld_y(i);
                }
            }
        }
    }
    // Whole words on the packed path: this invocation owns both halves of each word it writes.
    st4_y(first, v, p.numel);
}

// Dropout2d from the channel keep bits that dropout_mask wrote into `mask` just before (the
// host takes this path when unit_len >= 4, so that a quad spans at most two channels): one
// word load instead of two Philox calls per quad.
@compute @workgroup_size(256)
fn dropout2d_from_bits(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    forward_from_bits(linear_id(gid, nwg), ACCUMULATE);
}

fn forward_from_bits(g: u32, accumulate: bool) {
    let grid = channel_grid();
    if (g >= grid.y) {
        return;
    }
    for (var k = 0u; k < 4u; k++) {
        let first = 4u * (g + k * grid.y);
        if (first < p.numel) {
            quad_from_bits(first, accumulate);
        }
    }
}

// Dropout2d of the quad at `first` from the channel keep bits.
fn quad_from_bits(first: u32, accumulate: bool) {
    let e = p.base + first;
    let u0 = fast_div(e, p.div_unit);
    // Element e + k is in unit u0 or u0 + 1 (unit_len >= 4). Both bits are in word u0 / 32:
    // were u0 + 1 a multiple of 32, its first element S·(u0 + 1) would be a multiple of 4,
    // a quad's start, so no quad (e is a multiple of 4) would hold elements of both units.
    let step = select(vec4<u32>(0u), vec4<u32>(1u), vec4<u32>(e - u0 * p.unit_len) + vec4<u32>(0u, 1u, 2u, 3u) >= vec4<u32>(p.unit_len));
    let bit = vec4<u32>(u0 & 31u) + step;
    let keep = ((vec4<u32>(mask[u0 >> 5u]) >> bit) & vec4<u32>(1u)) == vec4<u32>(1u);
    apply4(first, select(vec4<f32>(0.0), vec4<f32>(p.scale), keep), accumulate);
}

// Dropout2d keep decisions of the four elements from flat index e (a multiple of 4). They
// belong to consecutive units u0 .. u0 + 3 at most, all within the eight units 4g .. 4g + 7
// (g = u0 / 4) that two Philox calls decide: always exactly those two calls, never one under a
// branch (a CPU driver runs both sides of a branch under a lane mask, so a conditional call
// costs every invocation). One (multiply-shift) division per four elements.
fn channel_keep(state: vec4<u32>, e: u32) -> vec4<bool> {
    let u0 = fast_div(e, p.div_unit);
    let g = u0 >> 2u;
    let lo = select(vec4<u32>(0u), vec4<u32>(1u, 2u, 4u, 8u), dropout_keep4(dropout_words(state, g), p.threshold, p.flags));
    let hi = select(vec4<u32>(0u), vec4<u32>(16u, 32u, 64u, 128u), dropout_keep4(dropout_words(state, g + 1u), p.threshold, p.flags));
    // Bit u − 4g: the keep decision of unit u.
    let bits = lo.x | lo.y | lo.z | lo.w | hi.x | hi.y | hi.z | hi.w;
    // Element e + k lies (r + k) / unit_len units past u0, r its offset in u0 (r + k <= 5 when
    // unit_len < 4, where the quotient is computed without dividing: x·11 >> 5 = x / 3 for
    // x <= 5).
    let x = vec4<u32>(e - u0 * p.unit_len) + vec4<u32>(0u, 1u, 2u, 3u);
    var step = select(vec4<u32>(0u), vec4<u32>(1u), x >= vec4<u32>(p.unit_len));
    if (p.unit_len < 4u) {
        step = select(select((x * 11u) >> vec4<u32>(5u), x >> vec4<u32>(1u), p.unit_len == 2u), x, p.unit_len == 1u);
    }
    let rel = vec4<u32>(u0 - 4u * g) + step;
    return ((vec4<u32>(bits) >> rel) & vec4<u32>(1u)) == vec4<u32>(1u);
}

@compute @workgroup_size(256)
fn dropout_apply_mask(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= p.numel) {
        return;
    }
    let u = fast_div(p.base + i, p.div_unit);
    let keep = ((mask[u / 32u] >> (u % 32u)) & 1u) == 1u;
    emit(i, ld_x(i) * select(0.0, p.scale, keep));
}

@compute @workgroup_size(256)
fn dropout_mask(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let w = linear_id(gid, nwg);
    if (w * 32u >= p.units) {
        return;
    }
    let state = load_state();
    var bits = 0u;
    for (var q = 0u; q < 8u; q++) {
        let g = w * 8u + q;
        let words = dropout_words(state, g);
        for (var k = 0u; k < 4u; k++) {
            let u = g * 4u + k;
            if (u < p.units && dropout_keep(words[k], p.threshold, p.flags)) {
                bits |= 1u << (q * 4u + k);
            }
        }
    }
    mask[w] = bits;
}

@compute @workgroup_size(1)
fn dropout_rng_advance() {
    let lo = rng_state.z + 1u;
    rng_state.z = lo;
    if (lo == 0u) {
        rng_state.w = rng_state.w + 1u;
    }
}
