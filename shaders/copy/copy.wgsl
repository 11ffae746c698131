// The bandwidth yardstick: dst = src in vec4 loads and stores. `normdrop bench` reports every
// op's effective bandwidth as a percentage of the faster of these two copies, measured in the
// same run on the same adapter. Dispatches over 65535 workgroups fold into y.
//
//   copy_vec4     one quad (4 floats) per invocation: the usual GPU copy.
//   copy_vec4_x4  quads g, g + t, g + 2t, g + 3t per invocation, t = ⌈n4/4⌉ invocations: a CPU
//                 driver pays a fixed cost per invocation that one quad does not amortise
//                 (lavapipe: 1.5-1.6x the bandwidth of copy_vec4). Strided by t, so that
//                 neighbouring invocations still touch neighbouring quads (GPUs coalesce those).

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

fn linear_id(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

@compute @workgroup_size(256)
fn copy_vec4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = linear_id(gid, nwg);
    if (i < p.n4) {
        dst[i] = src[i];
    }
}

@compute @workgroup_size(256)
fn copy_vec4_x4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = linear_id(gid, nwg);
    let t = (p.n4 + 3u) / 4u;
    if (g >= t) {
        return;
    }
    // Quad g always exists; the last invocations' later quads may lie past the end.
    dst[g] = src[g];
    for (var k = 1u; k < 4u; k++) {
        let i = g + k * t;
        if (i < p.n4) {
            dst[i] = src[i];
        }
    }
}
