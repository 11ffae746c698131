//! Dropout and Dropout2d: bit-exact masks against the CPU spec, statistics of the mask, the
//! scaling modes, the generator, and bad input.

mod common;

use common::{assert_close, Rng};
use normdrop::kernels::rng_state_bytes;
use normdrop::reference::dropout_forward;
use normdrop::rng::{self, DropRule};
use normdrop::{
    Context, DType, Dropout, Dropout2d, DropoutBuffers, DropoutConfig, DropoutKernel, DropoutMode, DropoutUnit, Error,
    Tensor,
};

fn read(ctx: &Context, t: &Tensor) -> Vec<f32> {
    t.to_vec_blocking(ctx).unwrap()
}

fn ones(ctx: &Context, shape: &[usize]) -> Tensor {
    Tensor::from_slice(ctx, &vec![1.0f32; shape.iter().product()], shape).unwrap()
}

/// The GPU mask (both the packed output and the zero pattern of y) equals the CPU spec.
fn assert_mask_matches(ctx: &Context, shape: &[usize], p: f64, seed: u64, offset: u64, unit: DropoutUnit) {
    let config = DropoutConfig::new(p);
    let mut d = match unit {
        DropoutUnit::Element => Dropout::with_config(ctx, config, seed).unwrap(),
        DropoutUnit::Channel => {
            // Dropout2d derefs to Dropout; unwrap the module to drive it the same way.
            let d2 = Dropout2d::with_config(ctx, config, seed).unwrap();
            return assert_mask_matches_2d(ctx, d2, shape, p, seed, offset);
        }
    };
    d.set_state(seed, offset);
    let (y, mask) = d.forward_with_mask(&ones(ctx, shape)).unwrap();
    let numel: usize = shape.iter().product();
    let expected = rng::mask(seed, offset, numel, DropRule::new(p).unwrap());
    let got = mask.to_bools_blocking(ctx).unwrap();
    let first_diff = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "shape {shape:?} p {p} seed {seed} offset {offset}: mask differs at unit {first_diff:?}"
    );
    let y = read(ctx, &y);
    let scale = config.scale(true);
    for (i, (&v, &k)) in y.iter().zip(&expected).enumerate() {
        assert_eq!(v, if k { scale } else { 0.0 }, "y[{i}] for shape {shape:?}");
    }
}

fn assert_mask_matches_2d(ctx: &Context, mut d: Dropout2d, shape: &[usize], p: f64, seed: u64, offset: u64) {
    d.set_state(seed, offset);
    let (y, mask) = d.forward_with_mask(&ones(ctx, shape)).unwrap();
    let unit_len: usize = shape[2..].iter().product();
    let units = shape[0] * shape[1];
    let expected = rng::mask(seed, offset, units, DropRule::new(p).unwrap());
    assert_eq!(
        mask.to_bools_blocking(ctx).unwrap(),
        expected,
        "Dropout2d shape {shape:?}"
    );
    let scale = DropoutConfig::new(p).scale(true);
    for (i, &v) in read(ctx, &y).iter().enumerate() {
        assert_eq!(
            v,
            if expected[i / unit_len] { scale } else { 0.0 },
            "Dropout2d y[{i}] shape {shape:?}"
        );
    }
}

#[test]
fn gpu_mask_equals_cpu_mask_bit_for_bit() {
    let ctx = gpu!();
    let mut rng = Rng::new(2024);
    let shapes: &[&[usize]] = &[
        &[1],
        &[3],
        &[4],
        &[5],
        &[31],
        &[32],
        &[33],
        &[7, 13],
        &[2, 3, 5, 7],
        &[1023],
        &[1025],
        &[4097, 3],
    ];
    for shape in shapes {
        for _ in 0..3 {
            let seed = rng.next_u64();
            let offset = rng.next_u64() >> (rng.next_u64() % 64);
            let p = [0.1, 0.5, 0.9, 0.33][(rng.next_u64() % 4) as usize];
            assert_mask_matches(&ctx, shape, p, seed, offset, DropoutUnit::Element);
        }
    }
    // Edge seeds and offsets: zero, all ones, high words only.
    for (seed, offset) in [(0, 0), (u64::MAX, u64::MAX), (1 << 32, 1 << 32), (0xdead_beef, 7)] {
        assert_mask_matches(&ctx, &[1000], 0.5, seed, offset, DropoutUnit::Element);
    }
}

#[test]
fn mask_is_the_same_with_and_without_64_bit_products() {
    // The shared context multiplies Philox's words with 64-bit integers where the adapter has
    // SHADER_INT64 (lavapipe's Vulkan does; GL does not); this one assembles the products from
    // 16-bit halves on the same adapter. Both must give the CPU twin's mask bit for bit.
    let shared = gpu!();
    eprintln!(
        "shared context has SHADER_INT64: {}",
        shared.features().contains(wgpu::Features::SHADER_INT64)
    );
    let plain = common::ctx_without(wgpu::Features::SHADER_INT64);
    for ctx in [&shared, &plain] {
        for (shape, seed, offset) in [
            (&[4097usize, 3][..], 7u64, 0u64),
            (&[1000], u64::MAX, u64::MAX),
            (&[33], 1 << 32, 5),
        ] {
            assert_mask_matches(ctx, shape, 0.5, seed, offset, DropoutUnit::Element);
            assert_mask_matches(ctx, shape, 0.1, seed ^ 1, offset, DropoutUnit::Element);
        }
        assert_mask_matches(ctx, &[2, 3, 5, 7], 0.3, 11, 3, DropoutUnit::Channel);
    }
}

#[test]
fn gpu_mask_equals_cpu_mask_over_ten_million_elements() {
    let ctx = gpu!();
    // 10_000_019 elements (prime): over 2400 workgroups of dropout and 39 of mask words.
    assert_mask_matches(
        &ctx,
        &[10_000_019],
        0.3,
        0x5eed_1234_abcd_0001,
        99,
        DropoutUnit::Element,
    );
}

#[test]
fn dropout2d_drops_whole_channels_with_the_cpu_mask() {
    let ctx = gpu!();
    let mut rng = Rng::new(77);
    // Spatial sizes 1, 2, 3 (units shorter than the four elements of a Philox call), 4, 5, 7,
    // 15, 16 and 49.
    let shapes: [&[usize]; 9] = [
        &[2, 3, 4, 4],
        &[5, 7, 3],
        &[1, 40, 1],
        &[3, 13, 2],
        &[3, 11, 5, 3],
        &[2, 9],
        &[2, 5, 4],
        &[3, 7, 5],
        &[2, 9, 7, 7],
    ];
    for shape in shapes {
        let seed = rng.next_u64();
        assert_mask_matches(&ctx, shape, 0.5, seed, rng.next_u64() % 1000, DropoutUnit::Channel);
    }
}

#[test]
fn keep_rate_is_within_five_sigma() {
    let ctx = gpu!();
    let n = 1usize << 20;
    for p in [0.1, 0.5, 0.9] {
        let mut d = Dropout::with_config(&ctx, DropoutConfig::new(p), 12345).unwrap();
        let (_, mask) = d.forward_with_mask(&ones(&ctx, &[n])).unwrap();
        let kept = mask.to_bools_blocking(&ctx).unwrap().iter().filter(|&&k| k).count() as f64;
        let q = 1.0 - p;
        let sigma = (n as f64 * p * q).sqrt();
        let z = (kept - n as f64 * q) / sigma;
        assert!(z.abs() < 5.0, "p {p}: kept {kept} of {n}, z = {z:.2}");
    }
}

/// Pearson correlation of two bit sequences.
fn correlation(a: &[bool], b: &[bool]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (
        a.iter().filter(|&&v| v).count() as f64 / n,
        b.iter().filter(|&&v| v).count() as f64 / n,
    );
    let cov = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(u8::from(x)) - ma) * (f64::from(u8::from(y)) - mb))
        .sum::<f64>()
        / n;
    cov / (ma * (1.0 - ma) * mb * (1.0 - mb)).sqrt()
}

#[test]
fn no_correlation_between_neighbours_or_consecutive_offsets() {
    let ctx = gpu!();
    let n = 1usize << 20;
    let mut d = Dropout::with_config(&ctx, DropoutConfig::new(0.5), 31337).unwrap();
    let m0 = d
        .forward_with_mask(&ones(&ctx, &[n]))
        .unwrap()
        .1
        .to_bools_blocking(&ctx)
        .unwrap();
    let m1 = d
        .forward_with_mask(&ones(&ctx, &[n]))
        .unwrap()
        .1
        .to_bools_blocking(&ctx)
        .unwrap();
    assert_eq!(d.state(), (31337, 2));
    let bound = 5.0 / (n as f64).sqrt();
    // Neighbours share a Philox call (lags 1–3) or not (lag 4).
    for lag in [1usize, 2, 3, 4, 32] {
        let r = correlation(&m0[..n - lag], &m0[lag..]);
        assert!(r.abs() < bound, "lag {lag}: r = {r:.5} (bound {bound:.5})");
    }
    let r = correlation(&m0, &m1);
    assert!(r.abs() < bound, "offsets 0 and 1: r = {r:.5}");
    assert_ne!(m0, m1);
}

#[test]
fn p_zero_is_identity_and_p_one_gives_zeros() {
    let ctx = gpu!();
    let x = Rng::new(1).normal_vec(1001, 0.0, 3.0);
    let xt = Tensor::from_slice(&ctx, &x, &[1001]).unwrap();
    for mode in [DropoutMode::Inverted, DropoutMode::ScaleAtInference] {
        let mut d0 = Dropout::with_config(&ctx, DropoutConfig { p: 0.0, mode }, 5).unwrap();
        let (y, mask) = d0.forward_with_mask(&xt).unwrap();
        assert_eq!(read(&ctx, &y), x, "{mode:?}");
        assert!(mask.to_bools_blocking(&ctx).unwrap().iter().all(|&k| k));
        let mut d1 = Dropout::with_config(&ctx, DropoutConfig { p: 1.0, mode }, 5).unwrap();
        let (y, mask) = d1.forward_with_mask(&xt).unwrap();
        assert!(read(&ctx, &y).iter().all(|&v| v == 0.0), "{mode:?}");
        assert!(mask.to_bools_blocking(&ctx).unwrap().iter().all(|&k| !k));
    }
}

#[test]
fn scaling_modes_in_train_and_eval() {
    let ctx = gpu!();
    let shape = [6, 50];
    let x = Rng::new(8).normal_vec(300, 1.0, 2.0);
    let xt = Tensor::from_slice(&ctx, &x, &shape).unwrap();
    for mode in [DropoutMode::Inverted, DropoutMode::ScaleAtInference] {
        let config = DropoutConfig { p: 0.25, mode };
        let mut d = Dropout::with_config(&ctx, config, 99).unwrap();
        let y = read(&ctx, &d.forward(&xt).unwrap());
        let (r, _) = dropout_forward(&x, &shape, &config, DropoutUnit::Element, 99, 0, true).unwrap();
        assert_close(&format!("{mode:?} train"), &y, &r, 1e-6, 1e-7);
        d.eval();
        let y = d.forward(&xt).unwrap();
        let (r, _) = dropout_forward(&x, &shape, &config, DropoutUnit::Element, 99, 1, false).unwrap();
        assert_close(&format!("{mode:?} eval"), &read(&ctx, &y), &r, 1e-6, 1e-7);
        match mode {
            // Eval inverted dropout is the identity and returns the input itself, as PyTorch does.
            DropoutMode::Inverted => assert_eq!(y.buffer(), xt.buffer()),
            DropoutMode::ScaleAtInference => assert_eq!(read(&ctx, &y), x.iter().map(|v| v * 0.75).collect::<Vec<_>>()),
        }
        assert_eq!(d.state(), (99, 1), "eval must not advance the generator");
    }
}

#[test]
fn nan_in_a_dropped_position_propagates_like_pytorch() {
    let ctx = gpu!();
    // x·0 is NaN for x = NaN: PyTorch multiplies by the mask, so do we.
    let mut d = Dropout::new(&ctx, 1.0).unwrap();
    let y = read(
        &ctx,
        &d.forward(&Tensor::from_slice(&ctx, &[f32::NAN, 1.0], &[2]).unwrap())
            .unwrap(),
    );
    assert!(y[0].is_nan() && y[1] == 0.0);
}

#[test]
fn generator_advances_and_explicit_state_reproduces() {
    let ctx = gpu!();
    let x = ones(&ctx, &[4096]);
    let mut d = Dropout::with_config(&ctx, DropoutConfig::new(0.5), 7).unwrap();
    let y0 = read(&ctx, &d.forward(&x).unwrap());
    assert_eq!(d.last_call().unwrap().offset, 0);
    let y1 = read(&ctx, &d.forward(&x).unwrap());
    assert_eq!(d.state(), (7, 2));
    assert_ne!(y0, y1, "consecutive calls must draw different masks");
    // The explicit state reproduces call 0 and does not move the module's own state.
    assert_eq!(read(&ctx, &d.forward_with_state(&x, 7, 0).unwrap()), y0);
    assert_eq!(d.state(), (7, 2));
    // Another module with the same seed gives the same sequence; another seed does not.
    let mut same = Dropout::with_config(&ctx, DropoutConfig::new(0.5), 7).unwrap();
    assert_eq!(read(&ctx, &same.forward(&x).unwrap()), y0);
    let mut other = Dropout::with_config(&ctx, DropoutConfig::new(0.5), 8).unwrap();
    assert_ne!(read(&ctx, &other.forward(&x).unwrap()), y0);
}

#[test]
fn low_level_advance_on_gpu_gives_consecutive_offsets_in_one_submission() {
    let ctx = gpu!();
    let device = ctx.device();
    let kernel = DropoutKernel::new(device);
    let n = 777usize;
    let plan = kernel
        .plan(device, &[n], &DropoutConfig::new(0.4), DropoutUnit::Element)
        .unwrap();
    let x = ones(&ctx, &[n]);
    let (y0, y1) = (
        Tensor::zeros(&ctx, &[n], DType::F32).unwrap(),
        Tensor::zeros(&ctx, &[n], DType::F32).unwrap(),
    );
    let rng_buf = Tensor::zeros(&ctx, &[4], DType::F32).unwrap(); // 16 bytes of storage
    ctx.queue()
        .write_buffer(rng_buf.buffer(), 0, &rng_state_bytes(42, u32::MAX as u64));
    let mut encoder = device.create_command_encoder(&Default::default());
    plan.encode(
        device,
        &mut encoder,
        true,
        &DropoutBuffers {
            x: x.slice(),
            y: y0.slice(),
            rng: rng_buf.slice(),
        },
    )
    .unwrap();
    kernel.encode_advance(device, &mut encoder, &rng_buf.slice()).unwrap();
    plan.encode(
        device,
        &mut encoder,
        true,
        &DropoutBuffers {
            x: x.slice(),
            y: y1.slice(),
            rng: rng_buf.slice(),
        },
    )
    .unwrap();
    ctx.queue().submit([encoder.finish()]);
    let rule = DropRule::new(0.4).unwrap();
    let scale = DropoutConfig::new(0.4).scale(true);
    // The offset carries from the low word into the high word.
    for (y, offset) in [(&y0, u32::MAX as u64), (&y1, 1u64 << 32)] {
        let expected: Vec<f32> = rng::mask(42, offset, n, rule)
            .iter()
            .map(|&k| if k { scale } else { 0.0 })
            .collect();
        assert_eq!(read(&ctx, y), expected, "offset {offset:#x}");
    }
    let state: Vec<u8> = pollster::block_on(ctx.read_buffer(rng_buf.buffer(), 0, 16)).unwrap();
    assert_eq!(state, rng_state_bytes(42, 1 << 32));
}

#[test]
fn bad_input_is_rejected() {
    let ctx = gpu!();
    for p in [-0.1, 1.1, f64::NAN, f64::INFINITY] {
        assert!(
            matches!(Dropout::new(&ctx, p), Err(Error::InvalidArgument { .. })),
            "p {p}"
        );
        assert!(
            matches!(Dropout2d::new(&ctx, p), Err(Error::InvalidArgument { .. })),
            "p {p}"
        );
    }
    let mut d2 = Dropout2d::new(&ctx, 0.5).unwrap();
    assert!(
        matches!(d2.forward(&ones(&ctx, &[8])), Err(Error::Shape { .. })),
        "Dropout2d needs (N, C, *)"
    );
    let mut d = Dropout::new(&ctx, 0.5).unwrap();
    assert!(matches!(
        d.forward(&Tensor::zeros(&ctx, &[0, 4], DType::F32).unwrap()),
        Err(Error::Shape { .. })
    ));
    assert_eq!(d.state(), (0, 0), "failed calls must not advance the generator");
    // A gradient whose dtype differs from the forward's input.
    d.forward(&Tensor::zeros(&ctx, &[4], DType::F16).unwrap()).unwrap();
    assert!(matches!(
        d.backward(&Tensor::zeros(&ctx, &[4], DType::F32).unwrap()),
        Err(Error::DType { .. })
    ));

    let device = ctx.device();
    let kernel = ctx.kernel::<DropoutKernel>().unwrap();
    let plan = kernel
        .plan(device, &[100], &DropoutConfig::new(0.5), DropoutUnit::Element)
        .unwrap();
    let (x, y) = (ones(&ctx, &[100]), Tensor::zeros(&ctx, &[100], DType::F32).unwrap());
    let rng_buf = Tensor::zeros(&ctx, &[4], DType::F32).unwrap();
    let small_mask = Tensor::zeros(&ctx, &[3], DType::F32).unwrap(); // 12 bytes < 4 words
    let mut encoder = device.create_command_encoder(&Default::default());
    let r = plan.encode_mask(device, &mut encoder, true, &rng_buf.slice(), &small_mask.slice());
    assert!(
        matches!(
            r,
            Err(Error::BufferTooSmall {
                what: "mask",
                needed: 16,
                got: 12,
                ..
            })
        ),
        "{r:?}"
    );
    let r = plan.encode(
        device,
        &mut encoder,
        true,
        &DropoutBuffers {
            x: x.slice(),
            y: x.slice(),
            rng: rng_buf.slice(),
        },
    );
    assert!(
        matches!(
            r,
            Err(Error::Aliased {
                what: "y",
                other: "x",
                ..
            })
        ),
        "{r:?}"
    );
    let r = plan.encode(
        device,
        &mut encoder,
        true,
        &DropoutBuffers {
            x: x.slice(),
            y: y.slice(),
            rng: small_mask.buffer().slice(..8),
        },
    );
    assert!(matches!(r, Err(Error::BufferTooSmall { what: "rng", .. })), "{r:?}");
    let r = plan.encode(
        device,
        &mut encoder,
        true,
        &DropoutBuffers {
            x: x.slice(),
            y: y.slice(),
            rng: y.slice(),
        },
    );
    assert!(
        matches!(
            r,
            Err(Error::Aliased {
                what: "rng",
                other: "y",
                ..
            })
        ),
        "{r:?}"
    );
}
