// include-only: validated as part of the shaders that include it.
// The BatchNorm forward's uniform (batch_norm/forward.wgsl, cpu/batch_norm/forward_channel.wgsl): mirrors `BnParams` in src/kernels/batch_norm.rs field by field.

struct Params {
    n: u32,          // samples in this dispatch's range (N unless the call is split over bindings)
    c: u32,          // channels C
    s: u32,          // spatial size S = ∏ dims after the channel axis
    m: u32,          // elements per channel in this range: n·S
    chunk_len: u32,  // elements per stats chunk (multiple of WG for batch_norm_stats, of 4 for batch_norm_stats_serial)
    chunks: u32,     // stats chunks per channel in this range = ceil(m / chunk_len)
    flags: u32,      // FLAG_* bits
    total: u32,      // elements in this range: n·C·S
    eps: f32,
    momentum: f32,
    drop_threshold: u32, // fused dropout: keep iff Philox word >= threshold
    drop_flags: u32,     // fused dropout: DROP_ALL
    drop_scale: f32,     // fused dropout: multiplier of kept elements
    part_base: u32,  // index of this range's first partial within a channel's partials
    parts: u32,      // partials per channel, over all ranges
    m_all: u32,      // elements per channel of the whole call: N·S
    elem_base: u32,  // flat index of this range's first element (multiple of 4)
    first: u32,      // 1 for the range that starts at sample 0 (it picks K)
    div_s: vec2<u32>, // multiply-shift pair of S (fast_div in lib/nchw.wgsl)
    div_c: vec2<u32>, // multiply-shift pair of C
    run: u32,        // quads (4 consecutive elements) per normalize invocation
    chan_base: u32,  // index in centre of this dispatch's channel 0 (GroupNorm's ranges of groups; 0 for BatchNorm)
}
