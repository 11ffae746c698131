//! What the `normdrop` command and the benchmarks share, kept out of the library's public
//! surface: the benchmark runners ([`runners`]: every op with its buffers, its minimal-traffic
//! formula, validation against the CPU reference and the paired timer) and the PyTorch fixture
//! reader ([`fixture`]: the safetensors case format of `tests/fixtures/FORMAT.md` and the
//! comparison rule). The library's own tests and criterion benches use them as a dev-dependency.

#![warn(missing_docs)]

pub mod fixture;
pub mod runners;
pub mod selftest;
