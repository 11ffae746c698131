//! Shared test helpers: one GPU context per test binary, and deterministic random data.
#![allow(dead_code)]

use std::sync::OnceLock;

use normdrop::Context;

/// Set to `1` to let GPU tests pass without running when no adapter exists. Documented in the
/// README; without it a missing adapter fails every GPU test.
pub const OPT_OUT: &str = "NORMDROP_ALLOW_NO_GPU";

/// The shared context, or `None` when there is no adapter and the opt-out is set.
/// Panics (failing the test) when there is no adapter and the opt-out is not set.
pub fn ctx() -> Option<Context> {
    static CTX: OnceLock<Result<Context, String>> = OnceLock::new();
    match CTX.get_or_init(|| Context::new_blocking().map_err(|e| e.to_string())) {
        Ok(c) => Some(c.clone()),
        Err(e) if std::env::var(OPT_OUT).is_ok_and(|v| v == "1") => {
            eprintln!("GPU test not run: {e} ({OPT_OUT}=1)");
            None
        }
        Err(e) => panic!(
            "no GPU adapter: {e}\nInstall a Vulkan driver (Debian: apt-get install mesa-vulkan-drivers) \
             or set {OPT_OUT}=1 to skip GPU tests explicitly"
        ),
    }
}

/// `let ctx = gpu!();` at the top of a GPU test.
#[macro_export]
macro_rules! gpu {
    () => {
        match common::ctx() {
            Some(c) => c,
            None => return,
        }
    };
}

/// SplitMix64: tiny, deterministic, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `n` values `mean + std·N(0,1)` as f32.
    pub fn normal_vec(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n).map(|_| (mean + std * self.normal()) as f32).collect()
    }
}

/// Asserts the fixture comparison rule `|got − exp| <= atol·max(1, max|exp|) + rtol·|exp|`.
pub fn assert_close(what: &str, got: &[f32], exp: &[f64], rtol: f64, atol: f64) {
    let got: Vec<f64> = got.iter().map(|&v| f64::from(v)).collect();
    let c = normdrop_cli::fixture::compare(&got, exp, rtol, atol);
    assert!(
        c.passed,
        "{what}: max_abs_err {:.3e} is {:.2}x the tolerance (rtol {rtol}, atol {atol}, {} values)",
        c.max_abs_err,
        c.worst_ratio,
        exp.len()
    );
}

/// BatchNorm reduce splits for property tests: both kinds, whatever the default of the
/// adapter under test, with chunks that do and do not divide typical channel sizes.
pub fn reduce_splits() -> impl proptest::strategy::Strategy<Value = normdrop::tuning::ReduceSplit> {
    use proptest::prelude::*;
    prop_oneof![
        (0u32..3).prop_map(|k| normdrop::tuning::ReduceSplit::Workgroup { chunk: 256 << k }),
        prop_oneof![Just(4u32), Just(8), Just(12), Just(64), Just(392)]
            .prop_map(|chunk| normdrop::tuning::ReduceSplit::Invocation { chunk }),
    ]
}

/// A context on the default adapter with `features` not requested, so that kernels take
/// their fallback paths even where the adapter has them.
pub fn ctx_without(features: wgpu::Features) -> Context {
    let ctx = Context::with_options_blocking(normdrop::ContextOptions {
        disabled_features: features,
        ..Default::default()
    })
    .expect("the default adapter opens without optional features");
    assert!(!ctx.features().intersects(features));
    ctx
}

/// A context of its own on the default adapter (not the shared one), for a test whose single
/// submission runs for seconds on a CPU driver. wgpu's GL backend holds an adapter-wide lock
/// while it executes a submission and panics a thread that waits for it longer than 6 s
/// ("Could not lock adapter context"), so on GL such a test would fail the tests running beside
/// it on the shared context; a separate context has its own lock.
pub fn own_ctx() -> Option<Context> {
    ctx()?;
    Some(Context::new_blocking().expect("the default adapter opens a second time"))
}
