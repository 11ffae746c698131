// include-only: validated as part of the shaders that include it.
// Welford accumulation and Chan et al.'s pairwise merge of (count, mean, M2) triples, with a
// workgroup tree reduction over them. Included by kernels that reduce statistics. The variance
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

// Tree-reduces every invocation's triple; every invocation gets the workgroup's total.
fn workgroup_merge(lid: u32, mine: Stat) -> Stat {
    shared_stat[lid] = mine;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            shared_stat[lid] = chan_merge(shared_stat[lid], shared_stat[lid + stride]);
        }
        workgroupBarrier();
    }
    let total = shared_stat[0];
    // Keep the next call from overwriting shared_stat[0] before everyone has read it.
    workgroupBarrier();
    return total;
}
