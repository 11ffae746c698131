// include-only: validated as part of the shaders that include it.
// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
// SC'11; the Random123 definition and its known-answer vectors) and normdrop's dropout
// decision. Included by every kernel that drops. The CPU twin is src/rng.rs; the two must agree
// bit for bit, which the tests check on every backend.
//
// Mask of element i (flat element index, or flat (n·C + c) channel index for Dropout2d):
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(i/4), hi32(i/4), lo32(offset), hi32(offset))
//   r       = philox4x32_10(counter, key)
//   keep_i  = r[i % 4] >= threshold,   threshold = min(floor(p·2^32), 2^32 − 1)  (p = 1: drop all)
// Element indices here are below 2^32, so hi32(i/4) = 0.

const PHILOX_M0: u32 = 0xD2511F53u;
const PHILOX_M1: u32 = 0xCD9E8D57u;
const PHILOX_W0: u32 = 0x9E3779B9u;
const PHILOX_W1: u32 = 0xBB67AE85u;

// mulhilo32(a, b): the (hi, lo) words of the 64-bit product, from lib/philox_mul.wgsl (16-bit
// halves, every device) or lib/philox_mul_int64.wgsl (one 64-bit multiply, devices with
// SHADER_INT64); shader_source swaps the second in (ALTERNATIVES).
// #include "lib/philox_mul.wgsl"

fn philox_round(c: vec4<u32>, k: vec2<u32>) -> vec4<u32> {
    let p0 = mulhilo32(PHILOX_M0, c.x);
    let p1 = mulhilo32(PHILOX_M1, c.z);
    return vec4<u32>(p1.x ^ c.y ^ k.x, p1.y, p0.x ^ c.w ^ k.y, p0.y);
}

// Ten rounds; the key is bumped by the Weyl constants before every round after the first.
fn philox4x32_10(counter: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = philox_round(counter, key);
    var k = key;
    for (var r = 1u; r < 10u; r++) {
        k = k + vec2<u32>(PHILOX_W0, PHILOX_W1);
        c = philox_round(c, k);
    }
    return c;
}

// The generator state a kernel reads: (seed lo, seed hi, offset lo, offset hi), from the
// including shader's `rng_state` binding (every includer declares one).
fn load_state() -> vec4<u32> {
    return rng_state;
}

// The four words serving elements 4g .. 4g+3.
fn dropout_words(state: vec4<u32>, g: u32) -> vec4<u32> {
    return philox4x32_10(vec4<u32>(g, 0u, state.z, state.w), state.xy);
}

// Three calls' words, for quads g.x, g.y, g.z, computed round by round together. One call is
// a chain of ten dependent multiplies, so a CPU core mostly waits on their latency; three
// independent chains interleaved fill those waits (lavapipe: a second call beside the first
// costs a small part of the first).
struct Words3 {
    a: vec4<u32>,
    b: vec4<u32>,
    c: vec4<u32>,
}

fn dropout_words3(state: vec4<u32>, g: vec3<u32>) -> Words3 {
    var w = Words3(
        philox_round(vec4<u32>(g.x, 0u, state.z, state.w), state.xy),
        philox_round(vec4<u32>(g.y, 0u, state.z, state.w), state.xy),
        philox_round(vec4<u32>(g.z, 0u, state.z, state.w), state.xy),
    );
    var k = state.xy;
    for (var r = 1u; r < 10u; r++) {
        k = k + vec2<u32>(PHILOX_W0, PHILOX_W1);
        w = Words3(philox_round(w.a, k), philox_round(w.b, k), philox_round(w.c, k));
    }
    return w;
}

// Multipliers of quads g.x, g.y, g.z (dropout_factors4 of each), from dropout_words3.
struct Factors3 {
    a: vec4<f32>,
    b: vec4<f32>,
    c: vec4<f32>,
}

fn dropout_factors4x3(state: vec4<u32>, g: vec3<u32>, threshold: u32, flags: u32, scale: f32) -> Factors3 {
    let w = dropout_words3(state, g);
    return Factors3(
        word_factors4(w.a, threshold, flags, scale),
        word_factors4(w.b, threshold, flags, scale),
        word_factors4(w.c, threshold, flags, scale),
    );
}

const DROP_ALL: u32 = 1u;   // p = 1: every element dropped, whatever the words

// Keep decision for one word: an integer compare, never through floats.
fn dropout_keep(word: u32, threshold: u32, flags: u32) -> bool {
    return (flags & DROP_ALL) == 0u && word >= threshold;
}

// Multipliers of elements 4g .. 4g+3: `scale` where kept, 0 where dropped (one Philox call).
fn dropout_factors4(state: vec4<u32>, g: u32, threshold: u32, flags: u32, scale: f32) -> vec4<f32> {
    return word_factors4(dropout_words(state, g), threshold, flags, scale);
}

// Multipliers of the four elements whose mask words are `words`: `scale` kept, 0 dropped.
fn word_factors4(words: vec4<u32>, threshold: u32, flags: u32, scale: f32) -> vec4<f32> {
    return select(vec4<f32>(0.0), vec4<f32>(scale), dropout_keep4(words, threshold, flags));
}

// Keep decisions for the four words of one Philox call.
fn dropout_keep4(words: vec4<u32>, threshold: u32, flags: u32) -> vec4<bool> {
    return vec4<bool>(
        dropout_keep(words.x, threshold, flags),
        dropout_keep(words.y, threshold, flags),
        dropout_keep(words.z, threshold, flags),
        dropout_keep(words.w, threshold, flags),
    );
}
