//! Validates every `shaders/*.wgsl`, in every storage variant (f32, f16, packed f16), with naga (the same major version wgpu 30 uses) so that a
//! broken shader fails `cargo build` with naga's own diagnostic, naming the file and line,
//! instead of failing later at pipeline creation on somebody's GPU.

use std::path::Path;

#[path = "src/shader_source.rs"]
#[allow(dead_code)]
mod shader_source;

fn main() {
    let dir = Path::new("shaders");
    println!("cargo:rerun-if-changed=shaders");
    println!("cargo:rerun-if-changed=src/shader_source.rs");
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("shaders/ directory must exist")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
    entries.sort();

    let mut failures = Vec::new();
    for path in &entries {
        println!("cargo:rerun-if-changed={}", path.display());
        let raw = std::fs::read_to_string(path).expect("shader is readable UTF-8");
        let shown = path.display().to_string();
        if raw.starts_with("// include-only") {
            // Shared code (e.g. it uses its includer's workgroup size); validated through every
            // shader that includes it.
            continue;
        }
        let lookup = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        // Every storage variant the kernels can build: f32 only for shaders without activations.
        let variants: &[shader_source::Storage] = if shader_source::has_activations(&raw) {
            &shader_source::Storage::ALL
        } else {
            &[shader_source::Storage::F32]
        };
        // With and without the subgroup alternatives of its includes, where they differ.
        let plain = shader_source::expand_variant(&raw, &lookup, shader_source::Storage::F32, false);
        let subgroup = shader_source::expand_variant(&raw, &lookup, shader_source::Storage::F32, true);
        let subgroup_options: &[bool] = if plain == subgroup { &[false] } else { &[false, true] };
        for (storage, subgroups) in variants
            .iter()
            .flat_map(|&st| subgroup_options.iter().map(move |&sg| (st, sg)))
        {
            let shown = format!(
                "{shown} [{}{}]",
                storage.name(),
                if subgroups { ", subgroups" } else { "" }
            );
            let source = match shader_source::expand_variant(&raw, &lookup, storage, subgroups) {
                Ok(s) => s,
                Err(e) => {
                    failures.push(format!("{shown}: {e}"));
                    continue;
                }
            };
            let module = match naga::front::wgsl::parse_str(&source) {
                Ok(m) => m,
                Err(e) => {
                    failures.push(e.emit_to_string_with_path(&source, &shown));
                    continue;
                }
            };
            // All capabilities: optional features (f16, subgroups) are chosen at run time from
            // the adapter, and each variant is additionally translated to every backend by a test.
            let mut validator =
                naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all());
            if let Err(e) = validator.validate(&module) {
                failures.push(e.emit_to_string_with_path(&source, &shown));
            }
        }
    }
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("{f}");
        }
        panic!(
            "{} shader(s) failed naga validation:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}
