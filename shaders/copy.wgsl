// The bandwidth yardstick: dst = src, four floats per invocation (vec4 loads and stores).
// `normdrop bench` reports every op's effective bandwidth as a percentage of this kernel's,
// measured in the same run on the same adapter. Dispatches over 65535 workgroups fold into y.

const WG: u32 = 256u;

struct Params {
    n4: u32,     // vec4 elements
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;        // (n4)
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;  // (n4)

@compute @workgroup_size(256)
fn copy_vec4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i < p.n4) {
        dst[i] = src[i];
    }
}
