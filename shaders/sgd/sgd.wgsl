// Plain SGD on one parameter tensor:  p ← p − lr·g.
// One invocation per element; dispatches over 65535 workgroups fold into y. f32.

const WG: u32 = 256u;

// Mirrors `SgdParams` in src/kernels/sgd.rs.
struct Params {
    n: u32,
    lr: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<f32>; // (n)
@group(0) @binding(2) var<storage, read> grad: array<f32>;        // (n)

@compute @workgroup_size(256)
fn sgd_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i < p.n) {
        param[i] = param[i] - p.lr * grad[i];
    }
}
