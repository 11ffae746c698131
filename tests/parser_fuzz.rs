//! Property tests over mutated safetensors state files and PyTorch fixtures: truncations,
//! flipped bytes, rewritten header lengths, and numbers in the header (shapes, data offsets,
//! configuration values) replaced by zero, negative or huge ones, and dtypes swapped.
//!
//! The rule for every reader (`state::deserialize`, the modules' `load_state_from_safetensors`,
//! `Fixture::from_bytes`): no panic, no abort, a typed error or a value, state unchanged on error,
//! and no single allocation larger than the file plus [`SLACK`] bytes. `normdrop check` on a
//! fixture that still parses must not panic either.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use normdrop::{BatchNorm, Error, LayerNorm, Tensor};
use normdrop_cli::fixture::Fixture;
use proptest::prelude::*;

/// The allocation a reader may make beyond the file's size (headers parsed into maps, names).
const SLACK: usize = 64 << 10;

/// Records the largest single allocation made on this thread while armed.
struct Tracking;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: allocations during thread teardown must not touch a destroyed local.
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `f` and returns its value with the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    let out = f();
    ARMED.with(|a| a.set(false));
    (out, LARGEST.with(Cell::get))
}

/// One way to damage a file image.
#[derive(Clone, Debug)]
enum Mutation {
    /// Keep the first `at` bytes (modulo the length).
    Truncate(usize),
    /// XOR byte `at` (modulo the length) with `mask`.
    Flip(usize, u8),
    /// Replace the 8-byte header length.
    HeaderLength(u64),
    /// Replace the `nth` integer in the header JSON (modulo their count) with `value`.
    Number(usize, String),
    /// Replace the `nth` dtype in the header (modulo their count) with `dtype`.
    DType(usize, &'static str),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        Just("0".to_string()),
        Just("1".to_string()),
        Just("-1".to_string()),
        Just("2147483648".to_string()),
        Just("4294967296".to_string()),
        Just("1099511627776".to_string()),
        Just("4611686018427387904".to_string()),
        Just("18446744073709551615".to_string()),
        Just("1e300".to_string()),
        any::<u32>().prop_map(|v| v.to_string()),
    ];
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1..=255u8).prop_map(|(at, m)| Mutation::Flip(at, m)),
        prop_oneof![Just(0u64), Just(u64::MAX), Just(1 << 40), 0..4096u64].prop_map(Mutation::HeaderLength),
        (any::<usize>(), interesting).prop_map(|(n, v)| Mutation::Number(n, v)),
        (
            any::<usize>(),
            prop_oneof![
                Just("F64"),
                Just("I64"),
                Just("F16"),
                Just("BOOL"),
                Just("U8"),
                Just("BF16")
            ]
        )
            .prop_map(|(n, d)| Mutation::DType(n, d)),
    ]
}

/// The header JSON of a safetensors image and the data after it.
fn split(image: &[u8]) -> (String, &[u8]) {
    let n = u64::from_le_bytes(image[..8].try_into().unwrap()) as usize;
    (String::from_utf8(image[8..8 + n].to_vec()).unwrap(), &image[8 + n..])
}

fn join(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Replaces the `nth` (modulo their count) match of `find` in `text` with `value`.
fn replace_nth(text: &str, spans: Vec<(usize, usize)>, nth: usize, value: &str) -> String {
    if spans.is_empty() {
        return text.to_string();
    }
    let (a, b) = spans[nth % spans.len()];
    format!("{}{}{}", &text[..a], value, &text[b..])
}

fn apply(image: &[u8], m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::Truncate(at) => image[..at % image.len()].to_vec(),
        Mutation::Flip(at, mask) => {
            let mut out = image.to_vec();
            let i = at % out.len();
            out[i] ^= mask;
            out
        }
        Mutation::HeaderLength(n) => {
            let mut out = image.to_vec();
            out[..8].copy_from_slice(&n.to_le_bytes());
            out
        }
        Mutation::Number(nth, value) => {
            let (header, data) = split(image);
            let bytes = header.as_bytes();
            let mut spans = Vec::new();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i].is_ascii_digit() {
                    let start = i;
                    while i < bytes.len() && bytes[i].is_ascii_digit() {
                        i += 1;
                    }
                    spans.push((start, i));
                } else {
                    i += 1;
                }
            }
            join(&replace_nth(&header, spans, *nth, value), data)
        }
        Mutation::DType(nth, dtype) => {
            let (header, data) = split(image);
            let spans: Vec<(usize, usize)> = header
                .match_indices("\"dtype\":\"")
                .map(|(at, s)| {
                    let start = at + s.len();
                    let end = start + header[start..].find('"').unwrap();
                    (start, end)
                })
                .collect();
            join(&replace_nth(&header, spans, *nth, dtype), data)
        }
    }
}

fn fixture_image(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/torch")
            .join(name),
    )
    .unwrap()
}

fn bn_state(ctx: &normdrop::Context) -> (BatchNorm, Vec<u8>) {
    let mut bn = BatchNorm::new(ctx, 3).unwrap();
    let x = Tensor::from_slice(ctx, &common::Rng::new(5).normal_vec(24, 1.0, 2.0), &[4, 3, 2]).unwrap();
    bn.forward(&x).unwrap();
    let image = bn.state_to_safetensors("").unwrap();
    (bn, image)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The safetensors state reader on damaged images: an error or a value, never more memory
    /// than the file.
    #[test]
    fn state_reader_holds(m in mutation()) {
        let ctx = common::ctx();
        // A valid image to damage (made once per case on the GPU when there is one; the reader
        // itself is host code).
        let image = match &ctx {
            Some(ctx) => bn_state(ctx).1,
            None => return Ok(()),
        };
        let damaged = apply(&image, &m);
        let (result, largest) = largest_allocation(|| normdrop::state::deserialize(&damaged));
        prop_assert!(largest <= damaged.len() + SLACK, "{m:?}: allocated {largest} bytes for a {}-byte file", damaged.len());
        if let Err(e) = result {
            prop_assert!(matches!(e, Error::SafeTensors(_)), "{m:?}: {e:?}");
        }
    }

    /// The fixture reader on damaged fixtures; `check` on what still parses must not panic.
    #[test]
    fn fixture_reader_holds(m in mutation(), which in 0..4usize) {
        let name = ["bn2d_train_basic.safetensors", "ln_basic.safetensors", "bn2d_eval.safetensors", "ln_odd_width.safetensors"][which];
        let damaged = apply(&fixture_image(name), &m);
        let (result, largest) = largest_allocation(|| Fixture::from_bytes("fuzz", &damaged));
        prop_assert!(largest <= damaged.len() + SLACK, "{m:?}: allocated {largest} bytes for a {}-byte file", damaged.len());
        if let (Ok(fx), Some(ctx)) = (result, common::ctx()) {
            // Errors and failed comparisons are both fine; a panic fails the test.
            let _ = normdrop_cli::fixture::check(&ctx, &fx);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Loading a damaged state into a module: an error leaves every parameter, running
    /// statistic and the counter as they were.
    #[test]
    fn module_state_loads_hold(m in mutation()) {
        let Some(ctx) = common::ctx() else { return Ok(()) };
        let (mut bn, image) = bn_state(&ctx);
        let before = bn.state_to_safetensors("").unwrap();
        let damaged = apply(&image, &m);
        if bn.load_state_from_safetensors(&damaged, "").is_err() {
            prop_assert_eq!(bn.state_to_safetensors("").unwrap(), before, "{:?} changed the state", m);
        }
        let mut ln = LayerNorm::new(&ctx, &[3]).unwrap();
        let before = ln.state_to_safetensors("").unwrap();
        if ln.load_state_from_safetensors(&damaged, "").is_err() {
            prop_assert_eq!(ln.state_to_safetensors("").unwrap(), before, "{:?} changed the LayerNorm state", m);
        }
    }
}
