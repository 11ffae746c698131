// include-only: validated as part of the shaders that include it.
// Philox's 32×32 → 64-bit products with one 64-bit multiply, for devices with SHADER_INT64
// (the alternative of lib/philox_mul.wgsl). A CPU driver turns it into one vector multiply of
// 32-bit halves; GPU compilers into a multiply-high and a multiply. lavapipe: dropout ops
// 1.06-1.14x faster than the 16-bit emulation.

// (hi, lo) words of the 64-bit product a·b. The low word is the 32-bit product rather than
// the 64-bit product's truncation: the same bits, but a CPU driver then narrows only the high
// halves of its 64-bit lanes back to 32 bits (lavapipe: dropout ops 1.1-1.15x faster).
fn mulhilo32(a: u32, b: u32) -> vec2<u32> {
    let prod = u64(a) * u64(b);
    return vec2<u32>(u32(prod >> 32u), a * b);
}
