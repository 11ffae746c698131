//! Validates every `shaders/*.wgsl`, in every variant a kernel can build (f32, f16 and packed f16
//! storage; with subgroup operations; vec4 f32), with naga (the same major version wgpu 30 uses) so that a
//! broken shader fails `cargo build` with naga's own diagnostic, naming the file and line,
//! instead of failing later at pipeline creation on somebody's GPU.

use std::path::Path;

#[path = "src/storage.rs"]
#[allow(dead_code)]
mod storage;

#[path = "src/shader_source.rs"]
#[allow(dead_code)]
mod shader_source;

fn main() {
    let dir = Path::new("shaders");
    println!("cargo:rerun-if-changed=shaders");
    println!("cargo:rerun-if-changed=src/shader_source.rs");
    println!("cargo:rerun-if-changed=src/storage.rs");
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
        // Every variant the kernels can build (storage, subgroups, int64, vec4).
        for variant in shader_source::variants_of(&raw, &lookup) {
            let shown = format!("{shown} [{}]", variant.name());
            let source = match shader_source::expand_variant(&raw, &lookup, variant) {
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
