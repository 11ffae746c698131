// include-only: validated as part of the shaders that include it.
// Row geometry shared by the LayerNorm passes (layer_norm/forward.wgsl, layer_norm/backward.wgsl): which
// row and lane an invocation works on, and how a row lies over the dropout mask's quads. The
// including shader declares `const WG` (256), `const REGS` (16) and a uniform `p` with rows, width, lanes, row_base, drop_threshold, drop_flags and drop_scale.

// #include "lib/philox.wgsl"

// Where an invocation works: its row, its lane within the row, and whether that row exists
// (the last workgroup may have spare segments; they still take part in every barrier).
struct Slot {
    row: u32,
    lane: u32,
    live: bool,
}

// A row's lane segment is merged in two levels: the first lane of every group of SEG_FOLD
// folds its group, then every lane folds the group partials (segment_merge, segment_sum3).
const SEG_FOLD: u32 = 16u;

// `lanes` is a power of two: shifts and masks, not divisions (a CPU driver divides lane by lane).
fn slot_of(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> Slot {
    let shift = countTrailingZeros(p.lanes);
    let row = (wid.x + wid.y * nwg.x) * (WG >> shift) + (lid >> shift);
    return Slot(row, lid & (p.lanes - 1u), row < p.rows);
}

// A row laid over the dropout mask's quads: global flat quad q holds elements 4q .. 4q + 3, one
// Philox call. The row's elements are global indices e0 .. e0 + W − 1, in quads q0 ..
// q0 + quads − 1; lane ℓ takes the row's quads ℓ, ℓ + lanes, … so every quad's mask is drawn
// once, and the element at column j is read at local index base + j.
struct Row {
    base: u32,   // local flat index of the row's first element
    e0: u32,     // its global flat index
    q0: u32,     // global quad holding it
    quads: u32,  // quads the row touches
}

fn row_of(at: Slot) -> Row {
    let base = at.row * p.width;
    let e0 = p.row_base * p.width + base;
    let q0 = e0 >> 2u;
    return Row(base, e0, q0, ((e0 + p.width + 3u) >> 2u) - q0);
}

// Column of element t of the row's quad k. Outside the row it wraps past the width, so
// `column(..) < p.width` is the "in this row" test.
fn column(r: Row, k: u32, t: u32) -> u32 {
    return 4u * (r.q0 + k) + t - r.e0;
}

// Most quads any row touches: W/4 when rows start on quads (W a multiple of 4), else up to two
// partial quads more. Rows fit in registers when this is at most REGS/4 per lane.
fn max_quads() -> u32 {
    if ((p.width & 3u) == 0u) {
        return p.width >> 2u;
    }
    return ((p.width + 2u) >> 2u) + 1u;
}

fn in_registers() -> bool {
    return max_quads() <= (REGS / 4u) * p.lanes;
}

// Dropout multipliers of the four elements of global quad q: one Philox call.
fn drop4(state: vec4<u32>, q: u32) -> vec4<f32> {
    return dropout_factors4(state, q, p.drop_threshold, p.drop_flags, p.drop_scale);
}

// Multipliers of the row's quad k: the mask's when `drop` (a literal at every call, so the
// path without dropout holds no Philox call), else ones.
fn quad_factors(state: vec4<u32>, r: Row, k: u32, drop: bool) -> vec4<f32> {
    if (drop) {
        return drop4(state, r.q0 + k);
    }
    return vec4<f32>(1.0);
}

// Dropout multipliers of the four consecutive elements from global flat index e: quad e/4,
// and the next quad when e is not on a quad boundary.
fn drop_span(state: vec4<u32>, e: u32) -> vec4<f32> {
    let o = e & 3u;
    let a = drop4(state, e >> 2u);
    if (o == 0u) {
        return a;
    }
    let b = drop4(state, (e >> 2u) + 1u);
    var both = array<f32, 8>(a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w);
    return vec4<f32>(both[o], both[o + 1u], both[o + 2u], both[o + 3u]);
}
