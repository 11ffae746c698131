//! Validates every `.wgsl` file under `shaders/`, in every variant a kernel can build (f32, f16 and packed f16
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

/// Every `.wgsl` file under `dir`, as paths relative to it with `/` separators, sorted.
fn wgsl_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("shaders/ directory must exist")
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if path.is_dir() {
            wgsl_files(&path, &format!("{prefix}{name}/"), out);
        } else if name.ends_with(".wgsl") {
            out.push(format!("{prefix}{name}"));
        }
    }
}

fn main() {
    let dir = Path::new("shaders");
    println!("cargo:rerun-if-changed=shaders");
    println!("cargo:rerun-if-changed=src/shader_source.rs");
    println!("cargo:rerun-if-changed=src/storage.rs");
    let mut names = Vec::new();
    wgsl_files(dir, "", &mut names);

    // The table the library compiles in: every shader file by its path under shaders/ (the
    // name `#include` directives and kernels use), so adding a file needs no list edited.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let mut table = String::from("/// Every file under `shaders/`, by its path there, as compiled into the crate.\n");
    table += "const SHADER_FILES: &[(&str, &str)] = &[\n";
    for name in &names {
        table += &format!(
            "    ({name:?}, include_str!({:?})),\n",
            format!("{manifest}/shaders/{name}")
        );
    }
    table += "];\n";
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("shader_files.rs"), table).expect("OUT_DIR is writable");

    let mut failures = Vec::new();
    for name in &names {
        let path = dir.join(name);
        println!("cargo:rerun-if-changed={}", path.display());
        let raw = std::fs::read_to_string(&path).expect("shader is readable UTF-8");
        let shown = format!("shaders/{name}");
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
