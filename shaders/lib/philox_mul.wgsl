// include-only: validated as part of the shaders that include it.
// Philox's 32×32 → 64-bit products without 64-bit integers, for every device. Replaced by
// lib/philox_mul_int64.wgsl where the device has SHADER_INT64; both give the same words (the
// dropout mask tests compare both with the CPU twin, bit for bit).

// (hi, lo) words of the 64-bit product a·b. WGSL has no 64-bit integers, so the high word is
// assembled from 16-bit halves; no partial sum below can exceed 2^32 − 1.
fn mulhilo32(a: u32, b: u32) -> vec2<u32> {
    let a_lo = a & 0xFFFFu;
    let a_hi = a >> 16u;
    let b_lo = b & 0xFFFFu;
    let b_hi = b >> 16u;
    let lo_lo = a_lo * b_lo;
    let t = a_hi * b_lo + (lo_lo >> 16u);
    let u = a_lo * b_hi + (t & 0xFFFFu);
    let hi = a_hi * b_hi + (t >> 16u) + (u >> 16u);
    return vec2<u32>(hi, a * b);
}

