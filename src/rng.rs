//! The dropout randomness spec, on the CPU: Philox4x32-10 and the keep decision. The WGSL twin
//! is `shaders/lib/philox.wgsl`; masks agree bit for bit on every device.
//!
//! For element `i` (the flat element index, or the flat `n·C + c` channel index for Dropout2d)
//! under generator state `(seed, offset)`:
//!
//! ```text
//! key     = (lo32(seed), hi32(seed))
//! counter = (lo32(i/4), hi32(i/4), lo32(offset), hi32(offset))
//! r       = philox4x32_10(counter, key)
//! keep_i  = r[i % 4] >= t,   t = min(floor(p · 2^32), 2^32 − 1) computed in f64
//! ```
//!
//! `p = 0` gives `t = 0` and keeps everything; `p = 1` is special-cased to drop everything.

use crate::error::{Error, Result};

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

fn round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(M0, c[0]);
    let (hi1, lo1) = mulhilo(M1, c[2]);
    [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
}

/// Philox4x32 with 10 rounds, as defined by Random123.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = round(counter, key);
    let mut k = key;
    for _ in 1..10 {
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        c = round(c, k);
    }
    c
}

/// A dropout probability turned into the integer keep rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropRule {
    /// Keep iff the Philox word is `>= threshold`.
    pub threshold: u32,
    /// `p = 1`: drop everything regardless of the words.
    pub drop_all: bool,
}

impl DropRule {
    /// The rule for drop probability `p`; an error unless `0 <= p <= 1`.
    pub fn new(p: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::invalid("dropout", format!("p must be in [0, 1], got {p}")));
        }
        if p == 1.0 {
            return Ok(Self {
                threshold: u32::MAX,
                drop_all: true,
            });
        }
        let t = (p * 4_294_967_296.0).floor().min(4_294_967_295.0);
        Ok(Self {
            threshold: t as u32,
            drop_all: false,
        })
    }

    /// Whether a word keeps its element.
    pub fn keeps(&self, word: u32) -> bool {
        !self.drop_all && word >= self.threshold
    }
}

/// Whether element (or channel) `index` is kept under `(seed, offset)` and `rule`.
pub fn keep(seed: u64, offset: u64, index: u64, rule: DropRule) -> bool {
    let g = index / 4;
    let words = philox4x32_10(
        [g as u32, (g >> 32) as u32, offset as u32, (offset >> 32) as u32],
        [seed as u32, (seed >> 32) as u32],
    );
    rule.keeps(words[(index % 4) as usize])
}

/// The mask of `n` consecutive indices starting at 0, one Philox call per four.
pub fn mask(seed: u64, offset: u64, n: usize, rule: DropRule) -> Vec<bool> {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut out = Vec::with_capacity(n);
    for g in 0..n.div_ceil(4) as u64 {
        let words = philox4x32_10([g as u32, (g >> 32) as u32, offset as u32, (offset >> 32) as u32], key);
        for w in words {
            if out.len() < n {
                out.push(rule.keeps(w));
            }
        }
    }
    out
}

/// Packs a mask 32 per word: index `i` is bit `i % 32` of word `i / 32` (least significant
/// first), the layout of the kernels' packed mask output.
pub fn pack_mask(mask: &[bool]) -> Vec<u32> {
    mask.chunks(32)
        .map(|c| c.iter().enumerate().fold(0u32, |w, (j, &k)| w | (u32::from(k) << j)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123's known-answer vectors for philox4x32 with 10 rounds (kat_vectors):
    /// counter, key, expected output.
    #[test]
    fn random123_known_answers() {
        let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0, 0, 0, 0],
                [0, 0],
                [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
            ),
            (
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0],
                [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
            ),
        ];
        for (counter, key, expected) in kat {
            assert_eq!(
                philox4x32_10(counter, key),
                expected,
                "counter {counter:08x?} key {key:08x?}"
            );
        }
    }

    #[test]
    fn thresholds_follow_the_spec() {
        assert_eq!(
            DropRule::new(0.0).unwrap(),
            DropRule {
                threshold: 0,
                drop_all: false
            }
        );
        assert_eq!(DropRule::new(0.5).unwrap().threshold, 1 << 31);
        assert_eq!(DropRule::new(0.25).unwrap().threshold, 1 << 30);
        assert_eq!(DropRule::new(1.0 - 1e-12).unwrap().threshold, u32::MAX);
        assert!(DropRule::new(1.0).unwrap().drop_all);
        for bad in [-1e-9, 1.000001, f64::NAN, f64::INFINITY] {
            assert!(DropRule::new(bad).is_err(), "{bad}");
        }
        // p = 0 keeps even a zero word; p = 1 drops even the largest.
        assert!(DropRule::new(0.0).unwrap().keeps(0));
        assert!(!DropRule::new(1.0).unwrap().keeps(u32::MAX));
    }

    #[test]
    fn mask_matches_keep_and_packs_lsb_first() {
        let rule = DropRule::new(0.3).unwrap();
        let m = mask(42, 7, 77, rule);
        for (i, &k) in m.iter().enumerate() {
            assert_eq!(k, keep(42, 7, i as u64, rule));
        }
        let packed = pack_mask(&m);
        assert_eq!(packed.len(), 3);
        for (i, &k) in m.iter().enumerate() {
            assert_eq!((packed[i / 32] >> (i % 32)) & 1 == 1, k);
        }
    }
}
