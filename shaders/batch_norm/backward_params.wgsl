// include-only: validated as part of the shaders that include it.
// The BatchNorm backward's uniform (batch_norm/backward.wgsl, cpu/batch_norm/backward_channel.wgsl): mirrors `BnBackwardParams` in src/kernels/batch_norm_backward.rs field by field.

struct Params {
    n: u32,
    c: u32,
    s: u32,
    m: u32,
    chunk_len: u32,
    chunks: u32,
    flags: u32,
    total: u32,
    drop_threshold: u32,
    drop_flags: u32,
    drop_scale: f32,
    part_base: u32,  // index of this range's first partial within a channel's partials
    parts: u32,      // partials per channel over all ranges
    m_all: u32,      // elements per channel of the whole call: N·S
    elem_base: u32,  // flat index of this range's first element (multiple of 4)
    first: u32,      // 1 for the range that starts at sample 0 (it picks K)
    div_s: vec2<u32>, // multiply-shift pair of S (fast_div in lib/nchw.wgsl)
    div_c: vec2<u32>, // multiply-shift pair of C
    run: u32,         // quads per invocation of the aligned dx entry points (S ≥ 4·run)
    chan_base: u32,   // index in coef of this dispatch's channel 0 (GroupNorm's ranges of groups; 0 for BatchNorm)
    group_chans: u32, // channels per save_mean entry without batch statistics (GroupNorm's C/G; 1 for BatchNorm)
    _pad: u32,
}
