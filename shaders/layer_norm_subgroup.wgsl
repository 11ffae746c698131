// LayerNorm forward with a row per subgroup, for CPU adapters with SUBGROUP (lavapipe): the
// same results as layer_norm.wgsl (same bindings, same uniform, same mask) within rounding.
//
//   ln_sg_forward_T           y = LN(x)
//   ln_sg_dropout_forward_T   y = LN(x)·m
//
// Why: a CPU driver runs a subgroup (8 invocations on lavapipe) as one SIMD thread and loads
// and stores storage and workgroup memory lane by lane, so a LayerNorm costs what its memory
// accesses cost. The row-block path (layer_norm.wgsl) reads x twice and every row's statistics
// from workgroup memory; here a subgroup holds its row in registers, reduces it with two
// subgroupAdds (no workgroup memory, no barrier) and writes y from the registers: x read once,
// y written once, γ and β read once per subgroup and kept in registers for all its rows.
//
// Geometry: workgroups of BLOCK = 64 invocations take blocks of 64 rows, as the row-block path
// does (the host dispatches the same grid). Subgroups are taken to be consecutive blocks of
// `size` invocations of local_invocation_index (as workgroup_reduce_subgroup.wgsl does); each
// of the 64 / size subgroups takes the block's rows sub, sub + 64/size, …, and lane ℓ of a row
// takes its quads in registers as ln_subgroup_rows.wgsl lays them out (`T` in an entry point's
// name: the triples of quads per lane it keeps). Only the vec4 variant (f32, W % 4 == 0) is
// ever bound.
//
// Statistics: exact two-pass from registers around K = x[r, 0]: mean of x − K by one
// subgroupAdd, then Σ (x − K − mean')² by a second; the variance is never E[x²] − E[x]².

// #include "philox.wgsl"
// #include "ln_subgroup_rows.wgsl"
// #vec4-variant

const BLOCK: u32 = 64u;

const FLAG_WEIGHT: u32 = 1u;     // multiply by γ
const FLAG_BIAS: u32 = 2u;       // add β

// Mirrors `LnParams` in src/kernels/layer_norm.rs (layer_norm.wgsl's `Params`).
struct Params {
    rows: u32,
    width: u32,
    flags: u32,
    eps: f32,
    drop_threshold: u32,
    drop_flags: u32,
    drop_scale: f32,
    lanes: u32,
    row_base: u32,   // global index of this dispatch's row 0 (chunked calls)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// #activation @binding(1) read x (rows, W)
// #activation @binding(2) read_write y (rows, W)
// #param @binding(3) weight (W) γ
// #param @binding(4) bias (W) β
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;  // (rows)
@group(0) @binding(6) var<storage, read_write> rstd_out: array<f32>;  // (rows)
@group(0) @binding(7) var<storage, read> rng_state: vec4<u32>;       // (seed lo, seed hi, offset lo, offset hi)

@compute @workgroup_size(64)
fn ln_sg_forward_2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(subgroup_size) size: u32) {
    sg_forward(wid.x + wid.y * nwg.x, lid, size, 2u, false);
}

@compute @workgroup_size(64)
fn ln_sg_forward_4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(subgroup_size) size: u32) {
    sg_forward(wid.x + wid.y * nwg.x, lid, size, 4u, false);
}

@compute @workgroup_size(64)
fn ln_sg_forward_8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(subgroup_size) size: u32) {
    sg_forward(wid.x + wid.y * nwg.x, lid, size, 8u, false);
}

@compute @workgroup_size(64)
fn ln_sg_dropout_forward_2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(subgroup_size) size: u32) {
    sg_forward(wid.x + wid.y * nwg.x, lid, size, 2u, true);
}

@compute @workgroup_size(64)
fn ln_sg_dropout_forward_4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(subgroup_size) size: u32) {
    sg_forward(wid.x + wid.y * nwg.x, lid, size, 4u, true);
}

@compute @workgroup_size(64)
fn ln_sg_dropout_forward_8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32, @builtin(subgroup_size) size: u32) {
    sg_forward(wid.x + wid.y * nwg.x, lid, size, 8u, true);
}

// β of row quad k (zeros past the row's `quads`, or without β).
fn quad_beta(k: u32, quads: u32) -> vec4<f32> {
    if (k < quads && (p.flags & FLAG_BIAS) != 0u) {
        return ld4a_bias(4u * k);
    }
    return vec4<f32>(0.0);
}

// x − K of row quad k at element `base` of the row (zeros past the row).
fn quad_x(base: u32, k: u32, quads: u32, shift: f32) -> vec4<f32> {
    if (k < quads) {
        return ld4a_x(base + 4u * k) - shift;
    }
    return vec4<f32>(0.0);
}

// Σ of a quad's deviations squared, zero past the row.
fn quad_m2(v: vec4<f32>, mean: f32, inside: bool) -> f32 {
    let d = select(vec4<f32>(0.0), v - mean, inside);
    return dot(d, d);
}

fn quad_store(base: u32, k: u32, quads: u32, v: vec4<f32>) {
    if (k < quads) {
        st4_y(base + 4u * k, v, base + 4u * k + 4u);
    }
}

// The lane's rows of block `block` with `triples` (a literal) triples of quads per lane;
// y ← y·m with `drop` (a literal).
fn sg_forward(block: u32, lid: u32, sgsize: u32, triples: u32, drop: bool) {
    let size = min(sgsize, BLOCK);
    let lane = lid & (size - 1u);
    let sub = lid / size;
    let quads = p.width >> 2u;
    var state = vec4<u32>(0u);
    if (drop) {
        state = load_state();
    }
    // γ and β of the lane's quads, for all its rows.
    // #unroll t 8
    let k{t} = triple_quads(lane, size, {t}u);
    var ga{t} = vec4<f32>(1.0);
    var gb{t} = vec4<f32>(1.0);
    var gc{t} = vec4<f32>(1.0);
    var ba{t} = vec4<f32>(0.0);
    var bb{t} = vec4<f32>(0.0);
    var bc{t} = vec4<f32>(0.0);
    if ({t}u < triples) {
        ga{t} = quad_gamma(k{t}.x, quads);
        gb{t} = quad_gamma(k{t}.y, quads);
        gc{t} = quad_gamma(k{t}.z, quads);
        ba{t} = quad_beta(k{t}.x, quads);
        bb{t} = quad_beta(k{t}.y, quads);
        bc{t} = quad_beta(k{t}.z, quads);
    }
    // #end-unroll
    let first = block * BLOCK;
    let last = min(first + BLOCK, p.rows);
    for (var row = first + sub; row < last; row += BLOCK / size) {
        let base = row * p.width;
        let shift = ld_x(base);
        let q0 = (p.row_base + row) * quads;
        // Load (shifted), and the lane's share of Σ (x − K).
        var sum = 0.0;
        // #unroll t 8
        var va{t} = vec4<f32>(0.0);
        var vb{t} = vec4<f32>(0.0);
        var vc{t} = vec4<f32>(0.0);
        if ({t}u < triples) {
            va{t} = quad_x(base, k{t}.x, quads, shift);
            vb{t} = quad_x(base, k{t}.y, quads, shift);
            vc{t} = quad_x(base, k{t}.z, quads, shift);
            sum += dot(va{t} + vb{t} + vc{t}, vec4<f32>(1.0));
        }
        // #end-unroll
        let mean = subgroupAdd(sum) / f32(p.width);
        var m2 = 0.0;
        // #unroll t 8
        if ({t}u < triples) {
            m2 += quad_m2(va{t}, mean, k{t}.x < quads) + quad_m2(vb{t}, mean, k{t}.y < quads) + quad_m2(vc{t}, mean, k{t}.z < quads);
        }
        // #end-unroll
        let rstd = 1.0 / sqrt(max(subgroupAdd(m2) / f32(p.width), 0.0) + p.eps);
        if (lane == 0u) {
            mean_out[p.row_base + row] = shift + mean;
            rstd_out[p.row_base + row] = rstd;
        }
        // Normalize from the registers (and drop: three interleaved Philox calls per triple).
        // #unroll t 8
        if ({t}u < triples) {
            var m{t} = Factors3(vec4<f32>(1.0), vec4<f32>(1.0), vec4<f32>(1.0));
            if (drop) {
                m{t} = dropout_factors4x3(state, vec3<u32>(q0) + k{t}, p.drop_threshold, p.drop_flags, p.drop_scale);
            }
            quad_store(base, k{t}.x, quads, ((va{t} - mean) * rstd * ga{t} + ba{t}) * m{t}.a);
            quad_store(base, k{t}.y, quads, ((vb{t} - mean) * rstd * gb{t} + bb{t}) * m{t}.b);
            quad_store(base, k{t}.z, quads, ((vc{t} - mean) * rstd * gc{t} + bc{t}) * m{t}.c);
        }
        // #end-unroll
    }
}
