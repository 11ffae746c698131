// include-only: validated as part of the shaders that include it.
// The LayerNorm forward's uniform (layer_norm/forward.wgsl, cpu/layer_norm/rows_forward_walk.wgsl): mirrors `LnParams` in src/kernels/layer_norm.rs field by field.

struct Params {
    rows: u32,
    width: u32,
    flags: u32,
    eps: f32,
    drop_threshold: u32,
    drop_flags: u32,
    drop_scale: f32,
    lanes: u32,      // invocations per row: a power of two in 1..=256
    row_base: u32,   // global index of this dispatch's row 0 (calls split over bindings)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}
