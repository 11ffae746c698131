// Dropout and Dropout2d, reproducible on every device (mask spec in philox.wgsl).
//
//   train:  y_i = x_i · m_i,   m_i = scale if keep(unit(i)) else 0
//           scale = 1/(1 − p) (inverted, PyTorch's) or 1 (scale-at-inference)
//   eval:   y_i = x_i · scale  with every unit kept: scale = 1 (inverted) or 1 − p
//   backward: the same map applied to dy (dropout is linear for a fixed mask), with the
//           forward's (seed, offset); with ACCUMULATE, y += instead of y =.
//   unit(i) = i for Dropout; the (n·C + c) channel of element i for Dropout2d (i / S).
// The product x·m (not a select) propagates NaN/Inf from dropped elements, as PyTorch does.
//
// Entry points:
//   dropout_forward   one invocation per 4 consecutive elements: one Philox call serves them
//                     (Dropout2d: one call per distinct channel among them).
//   dropout_apply_mask  one invocation per element: y = x·m with m read from a packed mask
//                     (the backward from a stored mask: dx = dy·m).
//   dropout_mask      one invocation per mask word: the packed keep bits of 32 units, unit u
//                     in bit u % 32 of word u / 32 (LSB first); bits past the last unit are 0.
//   rng_advance       one invocation: offset += 1 in the generator state (64-bit carry), so
//                     consecutive calls recorded in one submission draw fresh masks.
// Dispatches over 65535 workgroups fold into y. A tensor larger than one storage binding is
// processed in chunks: x and y are bound at the chunk's offset and `base` is the flat index of
// its first element, so the mask is the unchunked one. Precision: activations are stored as the
// variant says (f32, f16, packed f16; see the #activation lines), arithmetic is f32.

// #include "philox.wgsl"

const WG: u32 = 256u;
const ACCUMULATE: u32 = 2u;   // flags: add to y instead of overwriting it

// Mirrors `DropoutParams` in src/kernels/dropout.rs.
struct Params {
    numel: u32,      // elements of x and y
    unit_len: u32,   // elements per mask unit: 1 (Dropout) or S = ∏ spatial (Dropout2d)
    units: u32,      // mask units: numel, or N·C
    threshold: u32,  // keep iff word >= threshold
    flags: u32,      // DROP_ALL (p = 1 in training), ACCUMULATE
    scale: f32,      // multiplier of kept elements
    base: u32,       // flat index of element 0 of this dispatch (chunked calls; multiple of 4)
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// #activation @binding(1) read x (numel)
// #activation @binding(2) read_write y (numel)
@group(0) @binding(3) var<storage, read_write> rng_state: array<u32>; // (4) seed lo/hi, offset lo/hi
@group(0) @binding(4) var<storage, read_write> mask: array<u32>;     // (⌈units/32⌉) packed bits

// The value output element i gets: v, or y[i] + v with ACCUMULATE.
fn out_value(i: u32, v: f32) -> f32 {
    return select(0.0, ld_y(i), (p.flags & ACCUMULATE) != 0u) + v;
}

// Writes (or, with ACCUMULATE, adds) one output element.
fn emit(i: u32, v: f32) {
    st_y(i, out_value(i, v));
}

fn load_state() -> vec4<u32> {
    return vec4<u32>(rng_state[0], rng_state[1], rng_state[2], rng_state[3]);
}

fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

// The keep decision of one unit (its own Philox call).
fn unit_keep(state: vec4<u32>, u: u32) -> bool {
    let words = dropout_words(state, u / 4u);
    return dropout_keep(words[u % 4u], p.threshold, p.flags);
}

@compute @workgroup_size(256)
fn dropout_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = linear_id(gid, nwg);
    let first = g * 4u;
    if (first >= p.numel) {
        return;
    }
    let state = load_state();
    var m: vec4<f32>;
    if (p.unit_len == 1u) {
        // Dropout: the four elements are the four words of one Philox call.
        let w = dropout_words(state, p.base / 4u + g);
        let keep = vec4<bool>(
            dropout_keep(w.x, p.threshold, p.flags),
            dropout_keep(w.y, p.threshold, p.flags),
            dropout_keep(w.z, p.threshold, p.flags),
            dropout_keep(w.w, p.threshold, p.flags),
        );
        m = select(vec4<f32>(0.0), vec4<f32>(p.scale), keep);
    } else {
        // Dropout2d: usually all four elements share a channel; draw once per channel change.
        var unit = (p.base + first) / p.unit_len;
        var f = select(0.0, p.scale, unit_keep(state, unit));
        for (var k = 0u; k < 4u; k++) {
            let u = (p.base + first + k) / p.unit_len;
            if (u != unit) {
                unit = u;
                f = select(0.0, p.scale, unit_keep(state, unit));
            }
            m[k] = f;
        }
    }
    if (PAIR_STORES && first + 3u < p.numel) {
        // A whole group: this invocation owns both halves of each packed word.
        st2_y(first, out_value(first, ld_x(first) * m.x), out_value(first + 1u, ld_x(first + 1u) * m.y));
        st2_y(first + 2u, out_value(first + 2u, ld_x(first + 2u) * m.z), out_value(first + 3u, ld_x(first + 3u) * m.w));
    } else {
        for (var k = 0u; k < 4u; k++) {
            let i = first + k;
            if (i < p.numel) {
                st_y(i, out_value(i, ld_x(i) * m[k]));
            }
        }
    }
}

@compute @workgroup_size(256)
fn dropout_apply_mask(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i >= p.numel) {
        return;
    }
    let u = (p.base + i) / p.unit_len;
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
fn rng_advance() {
    let lo = rng_state[2] + 1u;
    rng_state[2] = lo;
    if (lo == 0u) {
        rng_state[3] = rng_state[3] + 1u;
    }
}
