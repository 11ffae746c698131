// LayerNorm over the trailing `width` = ∏ normalized_shape elements of each row, optionally
// fused with dropout (mask spec in philox.wgsl; element index = flat index row·width + j):
//
//   mean_r = (1/W) Σ_j h[r,j]            var_r = (1/W) Σ_j (h[r,j] − mean_r)²   (biased)
//   rstd_r = 1 / sqrt(var_r + eps)       y[r,j] = (h[r,j] − mean_r)·rstd_r·γ_j + β_j
//
//   ln_forward                   h = x
//   ln_dropout_forward           h = x, then y ← y·m           (LayerNorm, then dropout)
//   ln_residual_dropout_forward  h = residual + x·m, written out; y = LN(h)   (pre-norm block)
//   m = drop_scale if kept else 0 (train), drop_scale with every element kept (eval).
//
// Geometry: one workgroup of 256 per row (rows folded into y past 65535).
//   width <= 4096: the row is read once into registers (16 per invocation, strided by 256 so
//                  loads coalesce). Each invocation forms its exact local (count, mean, M2) by
//                  two passes over its registers; the workgroup Chan-merges them. Traffic:
//                  read x once, write y once.
//   width  > 4096: Welford per invocation over a strided slice, Chan merge, then a second read
//                  to normalize (the residual variant re-reads the h it wrote).
// Precision: f32 storage and accumulation; the variance is never E[x²] − E[x]². Statistics
// are taken around K, a value from the row itself (x[r, 0], or residual[r, 0] for the residual
// block), and rows are normalized as ((h − K) − (mean − K))·rstd, so off-centre rows
// (1000 + 0.1·randn) keep the precision of their spread.

// #include "welford.wgsl"
// #include "philox.wgsl"

const WG: u32 = 256u;
const REGS: u32 = 16u;
const ONCHIP_MAX: u32 = 4096u;   // WG · REGS

const FLAG_WEIGHT: u32 = 1u;     // multiply by γ
const FLAG_BIAS: u32 = 2u;       // add β

// Mirrors `LnParams` in src/kernels/layer_norm.rs.
struct Params {
    rows: u32,
    width: u32,
    flags: u32,
    eps: f32,
    drop_threshold: u32,
    drop_flags: u32,
    drop_scale: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;               // (rows, W)
@group(0) @binding(2) var<storage, read_write> y: array<f32>;         // (rows, W)
@group(0) @binding(3) var<storage, read> weight: array<f32>;          // (W) γ
@group(0) @binding(4) var<storage, read> bias: array<f32>;            // (W) β
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;  // (rows)
@group(0) @binding(6) var<storage, read_write> rstd_out: array<f32>;  // (rows)
@group(0) @binding(7) var<storage, read> rng_state: array<u32>;       // (4) seed lo/hi, offset lo/hi
@group(0) @binding(8) var<storage, read> residual: array<f32>;        // (rows, W)
@group(0) @binding(9) var<storage, read_write> h: array<f32>;         // (rows, W) residual + dropout(x)

fn row_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// γ and β of column j applied to a normalized value.
fn affine(j: u32, v: f32) -> f32 {
    var r = v;
    if ((p.flags & FLAG_WEIGHT) != 0u) {
        r = r * weight[j];
    }
    if ((p.flags & FLAG_BIAS) != 0u) {
        r = r + bias[j];
    }
    return r;
}

// Dropout multiplier of flat element e: one Philox call, word e % 4.
fn drop_factor(e: u32) -> f32 {
    let state = vec4<u32>(rng_state[0], rng_state[1], rng_state[2], rng_state[3]);
    let words = dropout_words(state, e / 4u);
    return select(0.0, p.drop_scale, dropout_keep(words[e % 4u], p.drop_threshold, p.drop_flags));
}

// The row's (mean − K, rstd) from shifted values v = h − K held in registers: exact local
// two-pass per invocation, Chan merge across the workgroup. Invocation 0 saves mean and rstd.
fn stats_from_registers(lid: u32, row: u32, shift: f32, v: ptr<function, array<f32, REGS>>) -> vec2<f32> {
    var n = 0.0;
    var sum = 0.0;
    for (var k = 0u; k < REGS; k++) {
        if (lid + k * WG < p.width) {
            n += 1.0;
            sum += (*v)[k];
        }
    }
    let local_mean = select(0.0, sum / n, n > 0.0);
    var m2 = 0.0;
    for (var k = 0u; k < REGS; k++) {
        if (lid + k * WG < p.width) {
            let d = (*v)[k] - local_mean;
            m2 += d * d;
        }
    }
    return finish_stats(lid, row, shift, Stat(n, local_mean, m2));
}

// Merges per-invocation triples of shifted values into the row's (mean − K, rstd); invocation 0
// saves mean = K + (mean − K) and rstd.
fn finish_stats(lid: u32, row: u32, shift: f32, mine: Stat) -> vec2<f32> {
    let total = workgroup_merge(lid, mine);
    let rstd = 1.0 / sqrt(max(total.m2 / f32(p.width), 0.0) + p.eps);
    if (lid == 0u) {
        mean_out[row] = shift + total.mean;
        rstd_out[row] = rstd;
    }
    return vec2<f32>(total.mean, rstd);
}

@compute @workgroup_size(256)
fn ln_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = row_index(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.width;
    if (p.width <= ONCHIP_MAX) {
        // Load the row once, reduce from registers, normalize from registers.
        let shift = x[base];
        var v: array<f32, REGS>;
        for (var k = 0u; k < REGS; k++) {
            let j = lid + k * WG;
            if (j < p.width) {
                v[k] = x[base + j] - shift;
            }
        }
        let st = stats_from_registers(lid, row, shift, &v);
        for (var k = 0u; k < REGS; k++) {
            let j = lid + k * WG;
            if (j < p.width) {
                y[base + j] = affine(j, (v[k] - st.x) * st.y);
            }
        }
    } else {
        // Wide row: Welford pass, then a second read to normalize.
        let shift = x[base];
        var acc = Stat(0.0, 0.0, 0.0);
        for (var j = lid; j < p.width; j += WG) {
            acc = welford_add(acc, x[base + j] - shift);
        }
        let st = finish_stats(lid, row, shift, acc);
        for (var j = lid; j < p.width; j += WG) {
            y[base + j] = affine(j, ((x[base + j] - shift) - st.x) * st.y);
        }
    }
}

@compute @workgroup_size(256)
fn ln_dropout_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = row_index(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.width;
    if (p.width <= ONCHIP_MAX) {
        let shift = x[base];
        var v: array<f32, REGS>;
        for (var k = 0u; k < REGS; k++) {
            let j = lid + k * WG;
            if (j < p.width) {
                v[k] = x[base + j] - shift;
            }
        }
        let st = stats_from_registers(lid, row, shift, &v);
        for (var k = 0u; k < REGS; k++) {
            let j = lid + k * WG;
            if (j < p.width) {
                y[base + j] = affine(j, (v[k] - st.x) * st.y) * drop_factor(base + j);
            }
        }
    } else {
        let shift = x[base];
        var acc = Stat(0.0, 0.0, 0.0);
        for (var j = lid; j < p.width; j += WG) {
            acc = welford_add(acc, x[base + j] - shift);
        }
        let st = finish_stats(lid, row, shift, acc);
        for (var j = lid; j < p.width; j += WG) {
            y[base + j] = affine(j, ((x[base + j] - shift) - st.x) * st.y) * drop_factor(base + j);
        }
    }
}

@compute @workgroup_size(256)
fn ln_residual_dropout_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = row_index(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.width;
    if (p.width <= ONCHIP_MAX) {
        // h = residual + dropout(x) out to memory and, shifted, into registers; then LN(h).
        let shift = residual[base];
        var v: array<f32, REGS>;
        for (var k = 0u; k < REGS; k++) {
            let j = lid + k * WG;
            if (j < p.width) {
                let e = base + j;
                let hv = residual[e] + x[e] * drop_factor(e);
                h[e] = hv;
                v[k] = hv - shift;
            }
        }
        let st = stats_from_registers(lid, row, shift, &v);
        for (var k = 0u; k < REGS; k++) {
            let j = lid + k * WG;
            if (j < p.width) {
                y[base + j] = affine(j, (v[k] - st.x) * st.y);
            }
        }
    } else {
        // Each invocation re-reads only the h elements it wrote itself, so no barrier is needed.
        let shift = residual[base];
        var acc = Stat(0.0, 0.0, 0.0);
        for (var j = lid; j < p.width; j += WG) {
            let e = base + j;
            let hv = residual[e] + x[e] * drop_factor(e);
            h[e] = hv;
            acc = welford_add(acc, hv - shift);
        }
        let st = finish_stats(lid, row, shift, acc);
        for (var j = lid; j < p.width; j += WG) {
            y[base + j] = affine(j, ((h[base + j] - shift) - st.x) * st.y);
        }
    }
}
