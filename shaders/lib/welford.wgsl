// include-only: validated as part of the shaders that include it.
// Welford accumulation and Chan et al.'s pairwise merge of (count, mean, M2) triples, and
// workgroup memory for merging them (LayerNorm's segment merges; BatchNorm's workgroup merges
// are in lib/workgroup_reduce.wgsl). Included by kernels that reduce statistics. The variance
// of a triple is M2 / count; it is never formed as E[x²] − E[x]².
//
// The including shader must declare `const WG: u32` (its workgroup size, a power of two).

struct Stat {
    n: f32,
    mean: f32,
    m2: f32,
}

// Adds one value to a running triple (Welford).
fn welford_add(acc: Stat, v: f32) -> Stat {
    let n = acc.n + 1.0;
    let d = v - acc.mean;
    let mean = acc.mean + d / n;
    return Stat(n, mean, acc.m2 + d * (v - mean));
}

// The triple of four values (exact in registers: their mean, then the squared deviations).
fn quad_stat(v: vec4<f32>) -> Stat {
    let mean = (v.x + v.y + v.z + v.w) * 0.25;
    let d = v - mean;
    return Stat(4.0, mean, dot(d, d));
}

// Merges two triples (Chan, Golub, LeVeque).
fn chan_merge(a: Stat, b: Stat) -> Stat {
    let n = a.n + b.n;
    if (n == 0.0) {
        return a;
    }
    let d = b.mean - a.mean;
    let fb = b.n / n;
    return Stat(n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb);
}

var<workgroup> shared_stat: array<Stat, WG>;
