//! Portability without the hardware: every shader variant the kernels build (f32, native f16 and
//! packed f16 of each op's shader, with and without its optional-feature alternatives and vec4
//! activations) is translated by naga to SPIR-V (Vulkan), MSL (Metal), HLSL
//! (DX12) and GLSL ES 3.1 (GL). Any translation error fails the test, except native f16 and
//! 64-bit integers to GLSL, which GL cannot have (see below). Runs without a GPU.

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use normdrop::kernels::Storage;

/// Translates `v` to every backend; returns whether GLSL refused any entry point for 64-bit
/// integers and for f16.
fn translate_all(v: &normdrop::kernels::ShaderVariant) -> (bool, bool) {
    let what = format!("{} [{}]", v.file, v.variant.name());
    let module =
        naga::front::wgsl::parse_str(&v.source).unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&v.source)));
    let info = Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&v.source)));

    let names: Vec<&str> = module.entry_points.iter().map(|e| e.name.as_str()).collect();
    for ep in v.entry_points {
        assert!(names.contains(ep), "{what}: entry point {ep} missing (has {names:?})");
    }

    // Variants are pipelines specialised by `override` flags, which the backends see as
    // constants (wgpu processes them the same way before translating): translate with every
    // flag off and with every flag on, so that both sides of each flag's branches are written.
    let flags: Vec<String> = module.overrides.iter().filter_map(|(_, o)| o.name.clone()).collect();
    let settings: &[f64] = if flags.is_empty() { &[0.0] } else { &[0.0, 1.0] };
    let mut refused = (false, false);
    for &value in settings {
        let mut constants = naga::back::PipelineConstants::default();
        for name in &flags {
            constants.insert(name.clone(), value);
        }
        let (module, info) = naga::back::pipeline_constants::process_overrides(&module, &info, None, &constants)
            .unwrap_or_else(|e| panic!("{what}: overrides {flags:?} = {value}: {e}"));
        let what = if flags.is_empty() {
            what.clone()
        } else {
            format!("{what} (flags {value})")
        };
        let (int64, f16) = translate_processed(&what, v, &module, &info);
        refused = (refused.0 || int64, refused.1 || f16);
    }
    refused
}

fn translate_processed(
    what: &str,
    v: &normdrop::kernels::ShaderVariant,
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
) -> (bool, bool) {
    let (module, info) = (module, info);

    let words = spv::write_vec(module, info, &spv::Options::default(), None)
        .unwrap_or_else(|e| panic!("{what} -> SPIR-V: {e}"));
    assert_eq!(words[0], 0x0723_0203, "{what}: SPIR-V magic");

    let (metal, _) = msl::write_string(module, info, &msl::Options::default(), &msl::PipelineOptions::default())
        .unwrap_or_else(|e| panic!("{what} -> MSL: {e}"));
    for ep in v.entry_points {
        assert!(metal.contains(ep), "{what}: MSL lacks {ep}");
    }

    let mut hlsl_out = String::new();
    hlsl::Writer::new(
        &mut hlsl_out,
        &hlsl::Options::default(),
        &hlsl::PipelineOptions::default(),
    )
    .write(module, info, None)
    .unwrap_or_else(|e| panic!("{what} -> HLSL: {e}"));
    assert!(hlsl_out.contains("[numthreads("), "{what}: HLSL has no compute entry");

    // GLSL has one entry point per translation, as wgpu's GL backend does it: the module is cut
    // down to what the entry point reaches first.
    let (mut refused_int64, mut refused_f16) = (false, false);
    for ep in v.entry_points {
        let (module, info) = naga::back::pipeline_constants::process_overrides(
            module,
            info,
            Some((naga::ShaderStage::Compute, ep)),
            &naga::back::PipelineConstants::default(),
        )
        .unwrap_or_else(|e| panic!("{what} ({ep}): {e}"));
        let mut out = String::new();
        let options = glsl::Options {
            version: glsl::Version::Embedded {
                version: 310,
                is_webgl: false,
            },
            ..Default::default()
        };
        let pipeline = glsl::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: ep.to_string(),
            multiview: None,
        };
        let result = glsl::Writer::new(
            &mut out,
            &module,
            &info,
            &options,
            &pipeline,
            naga::proc::BoundsCheckPolicies::default(),
        )
        .and_then(|mut w| w.write());
        // GLSL ES has no 64-bit integers and no 16-bit floats, and wgpu's GL backend never
        // offers SHADER_INT64 or SHADER_F16: GL builds the variants with 16-bit-half Philox
        // products and packed f16 (translated like every other). An entry point of those
        // variants that reaches either is refused for that reason (and some must be: pinned in
        // the test, so that it notices if naga ever starts accepting them).
        if let Err(e) = &result {
            let e = e.to_string();
            if v.variant.int64 && e.contains("width: 8") {
                refused_int64 = true;
                continue;
            }
            if v.variant.storage == Storage::F16 && e.contains("width: 2") {
                refused_f16 = true;
                continue;
            }
        }
        result.unwrap_or_else(|e| panic!("{what} -> GLSL ({ep}): {e}"));
        assert!(out.starts_with("#version 310 es"), "{what} ({ep})");
    }
    (refused_int64, refused_f16)
}

#[test]
fn every_shader_variant_translates_to_every_backend() {
    let variants = normdrop::kernels::shader_variants();
    // The 15 op shaders in 3 storages, each with and without 64-bit Philox products; the 2
    // BatchNorm GPU shaders also with and without subgroup operations; the vec4 f32 variants of
    // all 15; copy and SGD in f32 only: 8 (dropout) + 16 + 16 + 4 × 8 (BatchNorm: the two
    // one-invocation-per-chunk reductions, the two one-pass-per-channel shaders) + 8 × 8
    // (LayerNorm: forward, backward, the row-block forward and backward, four row-per-subgroup)
    // + 2, and GroupNorm's finalize shaders (no activations): the two workgroup ones with and
    // without subgroup operations, the two one-invocation-per-group ones: 6. (The two
    // one-pass BatchNorm and the four LayerNorm subgroup shaders use subgroup operations in every
    // variant: no alternative include to switch, and kernels build them only on devices with
    // SUBGROUP.)
    assert_eq!(variants.len(), 144);
    let files = |pick: fn(&normdrop::kernels::ShaderVariant) -> bool| -> Vec<&str> {
        variants.iter().filter(|v| pick(v)).map(|v| v.file).collect()
    };
    let subgroup_files = files(|v| v.variant.subgroups);
    assert_eq!(subgroup_files.len(), 18, "{subgroup_files:?}");
    assert!(subgroup_files
        .iter()
        .all(|f| f.starts_with("batch_norm/") || f.starts_with("group_norm/")));
    let vec4_files = files(|v| v.variant.vec4);
    assert_eq!(vec4_files.len(), 34, "{vec4_files:?}");
    let int64_files = files(|v| v.variant.int64);
    assert_eq!(int64_files.len(), 68, "{int64_files:?}");
    assert!(!int64_files.contains(&"copy/copy.wgsl") && !int64_files.contains(&"sgd/sgd.wgsl"));
    assert!(variants
        .iter()
        .filter(|v| v.variant.vec4)
        .all(|v| v.variant.storage == Storage::F32));
    for storage in [Storage::F32, Storage::F16, Storage::F16Packed] {
        assert!(
            variants.iter().filter(|v| v.variant.storage == storage).count() >= 5,
            "{storage:?}"
        );
    }
    // GLSL refuses 64-bit integers and f16 (see translate_processed): an int64 variant's Philox
    // draws and a native f16 variant's activations must meet that refusal somewhere.
    let (mut refused_int64, mut refused_f16) = (0, 0);
    for v in &variants {
        let (int64, f16) = translate_all(v);
        refused_int64 += usize::from(int64);
        refused_f16 += usize::from(f16);
    }
    assert!(refused_int64 >= 8, "{refused_int64} int64 variants refused by GLSL");
    assert!(refused_f16 >= 8, "{refused_f16} f16 variants refused by GLSL");
}

/// Every `.wgsl` file under `dir`, as paths relative to `shaders/` (`lib/philox.wgsl`).
fn wgsl_files(dir: &std::path::Path, prefix: &str, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() {
            wgsl_files(&entry.path(), &format!("{prefix}{name}/"), out);
        } else if name.ends_with(".wgsl") {
            out.push(format!("{prefix}{name}"));
        }
    }
}

#[test]
fn every_shader_file_is_covered() {
    let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders"));
    let variants = normdrop::kernels::shader_variants();
    let include_only = normdrop::kernels::include_only_files();
    let mut names = Vec::new();
    wgsl_files(dir, "", &mut names);
    assert!(names.len() >= 29, "{names:?}");
    for name in names {
        if include_only.contains(&name.as_str()) {
            // Shared code is translated as part of every variant that includes it.
            let marker = format!("// ---- included from {name} ----");
            assert!(
                variants.iter().any(|v| v.source.contains(&marker)),
                "shaders/{name} is included by no variant"
            );
        } else {
            assert!(
                variants.iter().any(|v| v.file == name),
                "shaders/{name} is not in kernels::shader_variants()"
            );
        }
    }
}
