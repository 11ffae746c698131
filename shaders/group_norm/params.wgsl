// include-only: validated as part of the shaders that include it.
// The uniform of GroupNorm's own passes (group_norm/forward.wgsl, group_norm/backward.wgsl):
// mirrors `GnParams` in src/kernels/group_norm.rs field by field.

struct Params {
    groups: u32,      // (sample, group) pairs N·G: one workgroup each in the finalize passes
    g: u32,           // groups per sample G
    group_chans: u32, // channels per group C/G
    parts: u32,       // partials per group (forward) or per (n, c) channel (backward)
    count: u32,       // elements per group L = C/G·S
    flags: u32,       // FLAG_* bits
    eps: f32,
    n: u32,           // samples N (backward's parameter pass)
    c: u32,           // channels C (backward's parameter pass)
    sums_base: u32,   // backward: index in partials of the per-(n, c) (Σdy·x̂, Σdy)
    _pad0: u32,
    _pad1: u32,
}

const FLAG_AFFINE: u32 = 1u;        // γ (and β) are used; backward writes dγ, dβ
const FLAG_ACCUM_PARAMS: u32 = 2u;  // backward: dγ += and dβ += instead of =
