//! Shader source preprocessing, shared by the library and `build.rs` (compiled into both via
//! `#[path]`, so the build-time validation sees exactly what the kernels compile). Directives,
//! each a WGSL comment so that an unexpanded file still reads as WGSL (`#param`, for f32
//! per-column parameters read as vectors in the vec4 variant, is described at [`param`]):
//!
//! ```text
//! // #include "lib/philox.wgsl"
//! // #activation @binding(1) read x          (N, C, S)
//! ```
//!
//! `#include` appends the named file's text to the end of the including file (WGSL module
//! declarations are order-independent), so naga's line numbers for the including file stay exact.
//!
//! `#activation` declares an activation tensor (an input, output or gradient whose dtype the
//! caller picks) and its accessors, all on the directive's own line (line numbers stay exact):
//! `ld_NAME(i: u32) -> f32` for every tensor, and for `read_write` ones `st_NAME(i: u32, v: f32)`
//! and `st2_NAME(i: u32, a: f32, b: f32)`, which stores elements `i` (even) and `i + 1` when the
//! caller writes both (packed: one whole-word store instead of two half-word updates). Built on
//! those, for every storage: `ld4_NAME(i) -> vec4<f32>` (elements `i .. i + 3`), `ld4a_NAME(i)`
//! (the same for `i` a multiple of 4) and, writable, `st4_NAME(i, v: vec4<f32>, n: u32)`, which
//! stores the elements of `v` whose index is below `n` (`i` a multiple of 4): whole words when
//! all four exist and `PAIR_STORES`, else one by one (in the vec4 variant, bound only to whole
//! vectors, a quad starting below `n` is whole: one store).
//! Kernels touch activations only through these, and always compute in f32; `to_storage(v)`
//! rounds a value as storing it would (for values a kernel both writes and keeps using). Each
//! [`Storage`] variant generates a different body:
//!
//! - `F32`: `array<f32>`; in the `vec4` variant of files marked `// #vec4-variant`,
//!   `array<vec4<f32>>`, where `ld4a_` and `st4_` are one 16-byte access (see [`Variant`]).
//! - `F16`: `array<f16>` with `enable f16;` (the device needs `SHADER_F16`).
//! - `F16Packed`: pairs of halves in `u32` words, element `i` in the low (even `i`) or high
//!   (odd `i`) half of word `i / 2`, converted with `unpack2x16float` / `pack2x16float`. Writable
//!   tensors are `array<atomic<u32>>` and a store replaces only its own half with `atomicAnd`
//!   then `atomicOr`: two invocations (or workgroups) writing the two halves of one word never
//!   lose each other's half, and the spare half of an odd-length tensor's last word is never
//!   written.

use crate::storage::Storage;

/// An optional device feature a shader variant can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Feature {
    /// Subgroup operations (`wgpu::Features::SUBGROUP`).
    Subgroups,
    /// 64-bit integers (`wgpu::Features::SHADER_INT64`).
    Int64,
}

/// Include files with an alternative for devices with a feature: `(feature, file,
/// alternative)`. A variant with the feature includes the alternative wherever a shader
/// includes the file; both define the same functions with the same results (up to rounding).
pub const ALTERNATIVES: &[(Feature, &str, &str)] = &[
    (
        Feature::Subgroups,
        "lib/workgroup_reduce.wgsl",
        "lib/workgroup_reduce_subgroup.wgsl",
    ),
    (Feature::Int64, "lib/philox_mul.wgsl", "lib/philox_mul_int64.wgsl"),
];

/// The line that marks a shader file as having a `vec4` variant (see [`Variant::vec4`]).
pub const VEC4_MARKER: &str = "// #vec4-variant";

/// Everything that selects one expansion of a shader file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    /// How activations are stored.
    pub storage: Storage,
    /// Use the subgroup alternatives of included files (devices with `SUBGROUP`).
    pub subgroups: bool,
    /// Use the 64-bit-integer alternatives of included files (devices with `SHADER_INT64`).
    pub int64: bool,
    /// f32 activations declared as `array<vec4<f32>>`, so that the aligned four-element
    /// accessors (`ld4a_`, `st4_`) are one 16-byte access. Only for files with the
    /// `// #vec4-variant` line and `Storage::F32`, and only bindable when every activation binding
    /// is a whole number of vectors at a 16-byte-aligned offset.
    pub vec4: bool,
}

impl Variant {
    /// Whether this variant includes the alternatives for `feature`.
    pub const fn uses(&self, feature: Feature) -> bool {
        match feature {
            Feature::Subgroups => self.subgroups,
            Feature::Int64 => self.int64,
        }
    }

    /// `f32`, `f32, subgroups, int64, vec4`, …: the variant as labels, build errors and test
    /// output name it.
    pub fn name(&self) -> String {
        let mut name = self.storage.name().to_string();
        for (on, what) in [
            (self.subgroups, "subgroups"),
            (self.int64, "int64"),
            (self.vec4, "vec4"),
        ] {
            if on {
                name += ", ";
                name += what;
            }
        }
        name
    }

    /// Scalar activations of `storage`, no optional features.
    pub const fn plain(storage: Storage) -> Self {
        Self {
            storage,
            subgroups: false,
            int64: false,
            vec4: false,
        }
    }
}

/// Whether `source` carries the [`VEC4_MARKER`] line (it has a `vec4` f32 variant).
pub fn has_vec4_variant(source: &str) -> bool {
    source.lines().any(|l| l.trim() == VEC4_MARKER)
}

/// Expands `// #include "name"` directives (each name at most once, resolving names with
/// `lookup`; for the features `variant` uses, the [`ALTERNATIVES`] of included files) and
/// `// #activation` directives for `variant`. Errors name the missing file or the malformed
/// directive.
pub fn expand_variant(
    source: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    variant: Variant,
) -> Result<String, String> {
    let Variant { storage, vec4, .. } = variant;
    if vec4 && (storage != Storage::F32 || !has_vec4_variant(source)) {
        return Err(format!(
            "a vec4 variant needs f32 storage and a `{VEC4_MARKER}` line (storage {})",
            storage.name()
        ));
    }
    let out = with_includes(source, lookup, variant)?;
    // Activations may be declared by an included file (a pass family's shared bindings).
    let activations = has_activations(&out);
    let out = expand_unrolls(&out)?;
    let mut lines = Vec::new();
    for (n, line) in out.lines().enumerate() {
        let line_no = |e: String| format!("line {}: {e}", n + 1);
        if let Some(rest) = line.trim().strip_prefix("// #activation") {
            lines.push(activation(rest, storage, vec4).map_err(line_no)?);
        } else if let Some(rest) = line.trim().strip_prefix("// #param") {
            lines.push(param(rest, vec4).map_err(line_no)?);
        } else {
            lines.push(line.to_string());
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    if activations {
        // `to_storage(v)`: v rounded as storing it in an activation tensor would round it.
        // `PAIR_STORES`: whether writing both halves of a word with `st2_*` pays (packed f16:
        // one store instead of four atomics); elsewhere kernels keep their per-element stores.
        text.push_str(&format!(
            "const PAIR_STORES: bool = {};\n",
            storage == Storage::F16Packed
        ));
        if has_vec4_variant(source) {
            // `VEC4`: this is the vec4 variant, which the host binds only where its guarantees
            // hold (whole 16-byte vectors; kernels may add their own, e.g. rows of whole quads).
            text.push_str(&format!("const VEC4: bool = {vec4};\n"));
        }
        text.push_str(match storage {
            Storage::F32 => "fn to_storage(v: f32) -> f32 { return v; }\n",
            Storage::F16 => "fn to_storage(v: f32) -> f32 { return f32(f16(v)); }\n",
            Storage::F16Packed => {
                "fn to_storage(v: f32) -> f32 { return unpack2x16float(pack2x16float(vec2<f32>(v, 0.0))).x; }\n"
            }
        });
    }
    if storage == Storage::F16 {
        // Must precede every declaration; on line 1 so that line numbers do not move.
        text.insert_str(0, "enable f16; ");
    }
    Ok(text)
}

/// Expands `// #unroll NAME COUNT` … `// #end-unroll` blocks: the lines between are written
/// COUNT times, the i-th time with every `{NAME}` replaced by i (0-based). For code that must
/// stay in registers on every driver: a loop over a private array indexed by its counter is
/// a gather and scatter per lane on a CPU driver unless the driver unrolls it (Mesa 22.3's
/// lavapipe does not unroll long bodies), while unrolled straight-line code with its own names
/// is plain SSA values. Blocks do not nest.
fn expand_unrolls(source: &str) -> Result<String, String> {
    let mut out = Vec::new();
    let mut block: Option<(usize, String, u32, Vec<&str>)> = None;
    for (n, line) in source.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("// #unroll ") {
            if block.is_some() {
                return Err(format!("line {}: #unroll blocks do not nest", n + 1));
            }
            let usage = || format!("line {}: expected `// #unroll NAME COUNT`", n + 1);
            let mut words = rest.split_whitespace();
            let name = name_of(words.next(), "").map_err(|_| usage())?;
            let count = words.next().and_then(|w| w.parse::<u32>().ok()).ok_or_else(usage)?;
            if words.next().is_some() || name.is_empty() {
                return Err(usage());
            }
            block = Some((n, format!("{{{name}}}"), count, Vec::new()));
        } else if trimmed == "// #end-unroll" {
            let (_, key, count, body) = block
                .take()
                .ok_or_else(|| format!("line {}: #end-unroll without #unroll", n + 1))?;
            for i in 0..count {
                out.extend(body.iter().map(|l| l.replace(&key, &i.to_string())));
            }
        } else if let Some((_, _, _, body)) = block.as_mut() {
            body.push(line);
        } else {
            out.push(line.to_string());
        }
    }
    if let Some((start, ..)) = block {
        return Err(format!("line {}: #unroll without #end-unroll", start + 1));
    }
    Ok(out.join("\n"))
}

/// Every variant a kernel can build from the file `raw`: each storage (f32 only without
/// activations); with and without each feature's [`ALTERNATIVES`] where they make a difference
/// to this file; and the vec4 f32 variant where the file has one. build.rs validates each, the
/// portability test translates each.
pub fn variants_of(raw: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Vec<Variant> {
    // A file whose includes are missing has no variants to list; expand_variant reports it.
    let included = with_includes(raw, lookup, Variant::plain(Storage::F32)).unwrap_or_else(|_| raw.to_string());
    let storages: &[Storage] = if has_activations(&included) {
        &Storage::ALL
    } else {
        &[Storage::F32]
    };
    let base = expand_variant(raw, lookup, Variant::plain(Storage::F32));
    let differs = |v: Variant| expand_variant(raw, lookup, v) != base;
    let options = |on: bool| -> &'static [bool] {
        if on {
            &[false, true]
        } else {
            &[false]
        }
    };
    let subgroups = options(differs(Variant {
        subgroups: true,
        ..Variant::plain(Storage::F32)
    }));
    let int64 = options(differs(Variant {
        int64: true,
        ..Variant::plain(Storage::F32)
    }));
    let mut out = Vec::new();
    for &storage in storages {
        for &subgroups in subgroups {
            for &int64 in int64 {
                let vec4s = options(storage == Storage::F32 && has_vec4_variant(raw));
                for &vec4 in vec4s {
                    out.push(Variant {
                        storage,
                        subgroups,
                        int64,
                        vec4,
                    });
                }
            }
        }
    }
    out
}

/// `source` with the text of every file it includes, directly or not, appended (each name at
/// most once, resolved with `lookup`; for the features `variant` uses, the [`ALTERNATIVES`] of
/// included files), each after a `// ---- included from NAME ----` line. Appending keeps naga's
/// line numbers for `source` exact.
fn with_includes(source: &str, lookup: &dyn Fn(&str) -> Option<String>, variant: Variant) -> Result<String, String> {
    let mut out = source.to_string();
    let mut seen: Vec<String> = Vec::new();
    let mut pending = directives(source);
    while let Some(name) = pending.pop() {
        let name = match ALTERNATIVES.iter().find(|(_, file, _)| *file == name) {
            Some((feature, _, alternative)) if variant.uses(*feature) => alternative.to_string(),
            _ => name,
        };
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

/// Whether `source` declares any activation tensor (and so has f16 variants).
pub fn has_activations(source: &str) -> bool {
    source.lines().any(|l| l.trim().starts_with("// #activation"))
}

fn directives(source: &str) -> Vec<String> {
    source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("// #include \"")?.strip_suffix('"'))
        .map(str::to_string)
        .collect()
}

/// N of a directive's `@binding(N)` word.
fn binding_of(word: Option<&str>, usage: &str) -> Result<u32, String> {
    word.and_then(|w| w.strip_prefix("@binding("))
        .and_then(|w| w.strip_suffix(')'))
        .and_then(|w| w.parse::<u32>().ok())
        .ok_or_else(|| usage.to_string())
}

/// A directive's NAME word: a WGSL identifier of ASCII letters, digits and `_`.
fn name_of<'a>(word: Option<&'a str>, usage: &str) -> Result<&'a str, String> {
    word.filter(|n| n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .ok_or_else(|| usage.to_string())
}

/// One `#param @binding(N) NAME [comment]` directive: a read-only f32 per-column parameter
/// (LayerNorm's γ, β), always f32 whatever the activations' storage, expanded to one line with
/// `ld_NAME(j) -> f32` and `ld4a_NAME(j) -> vec4<f32>` (columns j .. j + 3, j a multiple of 4).
/// In the vec4 variant it is an `array<vec4<f32>>` (the host binds that variant only where the
/// parameter's binding is whole vectors), so `ld4a_` is one 16-byte load.
fn param(rest: &str, vec4: bool) -> Result<String, String> {
    let usage = "expected `// #param @binding(N) NAME`";
    let mut words = rest.split_whitespace();
    let binding = binding_of(words.next(), usage)?;
    let name = name_of(words.next(), usage)?;
    let comment: Vec<&str> = words.collect();
    let decl = |ty: &str| format!("@group(0) @binding({binding}) var<storage, read> {name}: array<{ty}>;");
    let mut s = if vec4 {
        decl("vec4<f32>")
            + &format!(" fn ld_{name}(j: u32) -> f32 {{ return {name}[j >> 2u][j & 3u]; }}")
            + &format!(" fn ld4a_{name}(j: u32) -> vec4<f32> {{ return {name}[j >> 2u]; }}")
    } else {
        decl("f32")
            + &format!(" fn ld_{name}(j: u32) -> f32 {{ return {name}[j]; }}")
            + &format!(
                " fn ld4a_{name}(j: u32) -> vec4<f32> {{ \
                 return vec4<f32>({name}[j], {name}[j + 1u], {name}[j + 2u], {name}[j + 3u]); }}"
            )
    };
    if !comment.is_empty() {
        s += &format!(" // {}", comment.join(" "));
    }
    Ok(s)
}

/// One `#activation @binding(N) ACCESS NAME [comment]` directive, expanded to one line.
fn activation(rest: &str, storage: Storage, vec4: bool) -> Result<String, String> {
    let mut words = rest.split_whitespace();
    let usage = "expected `// #activation @binding(N) read|read_write NAME`";
    let binding = binding_of(words.next(), usage)?;
    let access = words
        .next()
        .filter(|a| *a == "read" || *a == "read_write")
        .ok_or(usage)?;
    let name = name_of(words.next(), usage)?;
    let comment: Vec<&str> = words.collect();
    let writable = access == "read_write";
    let decl = |ty: &str| format!("@group(0) @binding({binding}) var<storage, {access}> {name}: array<{ty}>;");
    let mut s = match storage {
        Storage::F32 if vec4 => {
            let mut s =
                decl("vec4<f32>") + &format!(" fn ld_{name}(i: u32) -> f32 {{ return {name}[i >> 2u][i & 3u]; }}");
            if writable {
                s += &format!(" fn st_{name}(i: u32, v: f32) {{ {name}[i >> 2u][i & 3u] = v; }}");
                s += &format!(" fn st2_{name}(i: u32, a: f32, b: f32) {{ st_{name}(i, a); st_{name}(i + 1u, b); }}");
            }
            s
        }
        Storage::F32 => {
            let mut s = decl("f32") + &format!(" fn ld_{name}(i: u32) -> f32 {{ return {name}[i]; }}");
            if writable {
                s += &format!(" fn st_{name}(i: u32, v: f32) {{ {name}[i] = v; }}");
                s += &format!(" fn st2_{name}(i: u32, a: f32, b: f32) {{ {name}[i] = a; {name}[i + 1u] = b; }}");
            }
            s
        }
        Storage::F16 => {
            let mut s = decl("f16") + &format!(" fn ld_{name}(i: u32) -> f32 {{ return f32({name}[i]); }}");
            if writable {
                s += &format!(" fn st_{name}(i: u32, v: f32) {{ {name}[i] = f16(v); }}");
                s += &format!(
                    " fn st2_{name}(i: u32, a: f32, b: f32) {{ {name}[i] = f16(a); {name}[i + 1u] = f16(b); }}"
                );
            }
            s
        }
        Storage::F16Packed if !writable => {
            decl("u32")
                + &format!(" fn ld_{name}(i: u32) -> f32 {{ return unpack2x16float({name}[i >> 1u])[i & 1u]; }}")
        }
        Storage::F16Packed => {
            decl("atomic<u32>")
                + &format!(
                    " fn ld_{name}(i: u32) -> f32 {{ return unpack2x16float(atomicLoad(&{name}[i >> 1u]))[i & 1u]; }}"
                )
                + &format!(
                    " fn st_{name}(i: u32, v: f32) {{ let half_shift = (i & 1u) * 16u; \
                     let half_bits = pack2x16float(vec2<f32>(v, 0.0)) & 0xffffu; \
                     atomicAnd(&{name}[i >> 1u], ~(0xffffu << half_shift)); \
                     atomicOr(&{name}[i >> 1u], half_bits << half_shift); }}"
                )
                + &format!(
                    " fn st2_{name}(i: u32, a: f32, b: f32) {{ \
                     atomicStore(&{name}[i >> 1u], pack2x16float(vec2<f32>(a, b))); }}"
                )
        }
    };
    // Four-element accessors over the ones above: ld4_ from any i, ld4a_ and st4_ from i a
    // multiple of 4 (one vector access in the vec4 variant).
    s += &format!(
        " fn ld4_{name}(i: u32) -> vec4<f32> {{ \
         return vec4<f32>(ld_{name}(i), ld_{name}(i + 1u), ld_{name}(i + 2u), ld_{name}(i + 3u)); }}"
    );
    if vec4 {
        s += &format!(" fn ld4a_{name}(i: u32) -> vec4<f32> {{ return {name}[i >> 2u]; }}");
    } else {
        s += &format!(" fn ld4a_{name}(i: u32) -> vec4<f32> {{ return ld4_{name}(i); }}");
    }
    if writable && vec4 {
        // The vec4 variant is bound only to whole 16-byte vectors, so a quad that starts below
        // `n` ends below it: one store, no tail.
        s += &format!(" fn st4_{name}(i: u32, v: vec4<f32>, n: u32) {{ {name}[i >> 2u] = v; }}");
    } else if writable {
        s += &format!(
            " fn st4_{name}(i: u32, v: vec4<f32>, n: u32) {{ \
             if (i + 3u < n) {{ if (PAIR_STORES) {{ st2_{name}(i, v.x, v.y); st2_{name}(i + 2u, v.z, v.w); }} \
             else {{ st_{name}(i, v.x); st_{name}(i + 1u, v.y); st_{name}(i + 2u, v.z); st_{name}(i + 3u, v.w); }} }} \
             else {{ for (var j = 0u; j < 4u; j++) {{ if (i + j < n) {{ st_{name}(i + j, v[j]); }} }} }} }}"
        );
    }
    if !comment.is_empty() {
        s += &format!(" // {}", comment.join(" "));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::expand_unrolls;

    #[test]
    fn unroll_repeats_its_block_with_the_index() {
        let src = "a\n  // #unroll t 3\nlet v{t} = {t}u + w{t};\n// #end-unroll\nb";
        assert_eq!(
            expand_unrolls(src).unwrap(),
            "a\nlet v0 = 0u + w0;\nlet v1 = 1u + w1;\nlet v2 = 2u + w2;\nb"
        );
        assert_eq!(expand_unrolls("// #unroll i 0\nx\n// #end-unroll").unwrap(), "");
    }

    #[test]
    fn unroll_errors_name_the_line() {
        for (src, line) in [
            ("x\n// #unroll t 2\ny", "line 2"),
            ("// #end-unroll", "line 1"),
            (
                "// #unroll t 2\n// #unroll u 2\n// #end-unroll\n// #end-unroll",
                "line 2",
            ),
            ("// #unroll t\n// #end-unroll", "line 1"),
            ("// #unroll t two\n// #end-unroll", "line 1"),
            ("// #unroll t-1 2\n// #end-unroll", "line 1"),
        ] {
            let e = expand_unrolls(src).unwrap_err();
            assert!(e.starts_with(line), "{src:?}: {e}");
        }
    }
}
