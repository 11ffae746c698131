// include-only: validated as part of the shaders that include it.
// Lane geometry of the row-per-subgroup LayerNorm passes (cpu/layer_norm/forward_rows.wgsl,
// cpu/layer_norm/backward_rows.wgsl; CPU adapters with SUBGROUP, vec4 variant only, W % 4 == 0):
// lane ℓ of a subgroup of `size` takes its row's quads ℓ, ℓ + size, ℓ + 2·size, … (neighbouring
// lanes, neighbouring quads), held in registers in triples (the interleaved Philox calls'
// grain) spelled out by the preprocessor's #unroll, because a private array indexed by a loop
// counter is a per-lane gather and scatter on a CPU driver. A pipeline keeps `triples` (its
// TRIPLES override constant) of the at most 8 triples the #unroll blocks spell out, so the
// driver drops the rest; the host picks the smallest T that holds ⌈W / 4 / size⌉ quads per
// lane at the adapter's smallest subgroup size (SG_TRIPLES in src/kernels/cpu.rs). The
// includer declares a uniform `p` with `flags` (bit 0: γ given) and `width`, and a `weight`
// parameter binding.

// The row quads of the lane's triple t: lane + size·(3t + u), u = 0, 1, 2.
fn triple_quads(lane: u32, size: u32, t: u32) -> vec3<u32> {
    return vec3<u32>(lane) + size * (vec3<u32>(3u * t) + vec3<u32>(0u, 1u, 2u));
}

// γ of row quad k (ones past the row's `quads`, or without γ).
fn quad_gamma(k: u32, quads: u32) -> vec4<f32> {
    if (k < quads && (p.flags & 1u) != 0u) {
        return ld4a_weight(4u * k);
    }
    return vec4<f32>(1.0);
}
