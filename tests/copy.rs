//! The bandwidth yardstick `normdrop bench` measures every op against: both copy grains move
//! every quad exactly once, whatever the length (the four-quad grain's last invocations have
//! fewer than four quads), and a bad plan or aliasing buffers are refused.

mod common;

use common::Rng;
use normdrop::kernels::{CopyGrain, CopyKernel};
use normdrop::{Error, Tensor};

#[test]
fn both_grains_copy_every_quad_exactly() {
    let ctx = gpu!();
    let kernel = ctx.kernel::<CopyKernel>().unwrap();
    let mut rng = Rng::new(31);
    // Quads: 1 to 5 (fewer than one per slot of the four-quad grain), around a 256-invocation
    // workgroup and the four-quad grain's stride, and a bench-sized copy (~4.6 MiB).
    for quads in [1usize, 2, 3, 4, 5, 255, 1023, 1024, 1025, 4097, 300_001] {
        let n = 4 * quads;
        let src: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let x = Tensor::from_slice(&ctx, &src, &[n]).unwrap();
        for grain in CopyGrain::ALL {
            // A sentinel past the end shows nothing is written beyond n.
            let y = Tensor::from_slice(&ctx, &vec![-7.0f32; n + 4], &[n + 4]).unwrap();
            let plan = kernel.plan_with(ctx.device(), n, grain).unwrap();
            assert_eq!((plan.grain(), plan.bytes()), (grain, 4 * n as u64));
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            plan.encode(ctx.device(), &mut encoder, &x.slice(), &y.slice()).unwrap();
            ctx.queue().submit([encoder.finish()]);
            let got: Vec<f32> = y.to_vec_blocking(&ctx).unwrap();
            assert!(got[..n] == src[..], "{quads} quads, {grain:?}: copy differs");
            assert_eq!(got[n..], [-7.0; 4], "{quads} quads, {grain:?}: wrote past the end");
        }
    }
}

#[test]
fn bad_copies_are_refused() {
    let ctx = gpu!();
    let kernel = ctx.kernel::<CopyKernel>().unwrap();
    for n in [0, 3, 6] {
        for grain in CopyGrain::ALL {
            let e = kernel.plan_with(ctx.device(), n, grain).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{n}: {e}");
        }
    }
    let plan = kernel.plan_with(ctx.device(), 8, CopyGrain::Four).unwrap();
    let x = Tensor::zeros(&ctx, &[8], normdrop::DType::F32).unwrap();
    let short = Tensor::zeros(&ctx, &[4], normdrop::DType::F32).unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let e = plan
        .encode(ctx.device(), &mut encoder, &x.slice(), &x.slice())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Aliased {
                what: "dst",
                other: "src",
                ..
            }
        ),
        "{e}"
    );
    let e = plan
        .encode(ctx.device(), &mut encoder, &x.slice(), &short.slice())
        .unwrap_err();
    assert!(matches!(e, Error::BufferTooSmall { .. }), "{e}");
}
