// include-only: validated as part of the shaders that include it.
// The LayerNorm backward's uniform (layer_norm/backward.wgsl, cpu/layer_norm/rows_backward_walk.wgsl): mirrors `LnBackwardParams` in src/kernels/layer_norm_backward.rs field by field.

struct Params {
    rows: u32,
    width: u32,
    flags: u32,
    row_blocks: u32,
    drop_threshold: u32,
    drop_flags: u32,
    drop_scale: f32,
    col_tiles: u32,
    lanes: u32,      // invocations per row in the dx passes (power of two, 1..=256)
    row_base: u32,   // global index of this dispatch's row 0 (calls split over bindings)
    block_base: u32, // global index of this dispatch's first block of 64 rows
    total_blocks: u32, // row blocks of the whole call (layer_norm_backward_params_final)
}
