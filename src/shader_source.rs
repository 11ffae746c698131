//! WGSL has no `#include`; normdrop shaders share code (Philox) through one directive:
//!
//! ```text
//! // #include "philox.wgsl"
//! ```
//!
//! [`expand`] appends each included file's text to the end of the including file (WGSL module
//! declarations are order-independent), so naga's line numbers for the including file stay
//! exact. This file is compiled twice: into the library, and into `build.rs` via `#[path]`,
//! so the build-time validation sees exactly what the kernels compile.

/// Expands `// #include "name"` directives, each name at most once, resolving names with
/// `lookup`. Errors name the missing file.
pub fn expand(source: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = source.to_string();
    let mut seen: Vec<String> = Vec::new();
    let mut pending = directives(source);
    while let Some(name) = pending.pop() {
        if seen.contains(&name) {
            continue;
        }
        let text = lookup(&name).ok_or_else(|| format!("#include \"{name}\": no such shader"))?;
        pending.extend(directives(&text));
        out.push_str(&format!("\n// ---- included from {name} ----\n"));
        out.push_str(&text);
        seen.push(name);
    }
    Ok(out)
}

fn directives(source: &str) -> Vec<String> {
    source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("// #include \"")?.strip_suffix('"'))
        .map(str::to_string)
        .collect()
}
