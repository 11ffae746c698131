// include-only: validated as part of the shaders that include it.
// Index arithmetic over an (N, C, S) view without a division per element. Integer division is
// scalarized on CPU drivers (lavapipe: 8 scalar divides per SIMD operation) and costly on GPUs,
// so an invocation divides once to find where it starts and then advances by increments.
//
// Element-wise passes: a position is (channel, s) of a flat index, s in 0..S.
// Channel reductions: a walk is (n, s) within one channel, j = n·S + s in channel order.

// #include "lib/philox_mul.wgsl"

// n / d for n < 2^31, from the divisor's multiply-shift pair `d` = (m, s) that the host computes
// (`FastDiv` in src/kernels/mod.rs): mulhi(n, m) >> s, or n itself when m = 0 (d = 1). One
// widening multiply instead of a division, which CPU drivers scalarize and GPUs emulate
// (lavapipe: BatchNorm normalize 1.13x faster with the channel computed by a constant divisor).
fn fast_div(n: u32, d: vec2<u32>) -> u32 {
    return select(mulhilo32(n, d.x).x >> d.y, n, d.x == 0u);
}

// (channel, s) of flat element i (< 2^31), with `div_s` and `div_c` the multiply-shift pairs of
// S and C: the one pair of divisions an element-wise invocation pays.
fn channel_position(i: u32, s_len: u32, channels: u32, div_s: vec2<u32>, div_c: vec2<u32>) -> vec2<u32> {
    let q = fast_div(i, div_s);
    return vec2<u32>(q - fast_div(q, div_c) * channels, i - q * s_len);
}

// The position of the flat element after `pos`: the next s, or the next channel's first (the
// channel after the last is channel 0 of the next sample).
fn next_position(pos: vec2<u32>, s_len: u32, channels: u32) -> vec2<u32> {
    if (pos.y + 1u < s_len) {
        return vec2<u32>(pos.x, pos.y + 1u);
    }
    return vec2<u32>(next_channel(pos.x, channels), 0u);
}

// The channel after c in flat order: c + 1, or channel 0 of the next sample after the last.
fn next_channel(c: u32, channels: u32) -> u32 {
    return select(c + 1u, 0u, c + 1u == channels);
}

struct Walk {
    n: u32,
    s: u32,
}

// The walk position of channel-order index j.
fn walk_start(j: u32, s_len: u32) -> Walk {
    let n = j / s_len;
    return Walk(n, j - n * s_len);
}

// Advances a walk by `by` = walk_start(distance) (by.s < S).
fn walk_step(w: Walk, by: Walk, s_len: u32) -> Walk {
    var n = w.n + by.n;
    var s = w.s + by.s;
    if (s >= s_len) {
        s -= s_len;
        n += 1u;
    }
    return Walk(n, s);
}

// True when the four elements from index i (at spatial index s) lie in one run of S and
// before `end`: the straight-line vector paths apply (always when S % 4 == 0, away from the end).
fn quad_fits(s: u32, s_len: u32, i: u32, end: u32) -> bool {
    return s + 4u <= s_len && i + 4u <= end;
}

// Flat index of a walk position of channel c.
fn walk_flat(w: Walk, c: u32, s_len: u32, channels: u32) -> u32 {
    return (w.n * channels + c) * s_len + w.s;
}
