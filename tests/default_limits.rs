//! On a device created with WebGPU's default limits (8 storage buffers per shader stage, the
//! limit an embedding program most often has), every kernel builds and BatchNorm, LayerNorm and
//! dropout run; the residual LayerNorm block, which needs 9, is refused with a typed error that
//! names the limit.

mod common;

use normdrop::nn::{LayerNorm, LayerNormDropout, ResidualDropoutLayerNorm};
use normdrop::{
    BatchNorm, BatchNormBackwardKernel, BatchNormKernel, Context, DropoutConfig, DropoutKernel, Error,
    LayerNormBackwardKernel, LayerNormConfig, LayerNormKernel, SgdKernel, Storage, Tensor,
};

fn default_limits_ctx() -> Option<Context> {
    // The shared context only proves that an adapter exists (or that the opt-out is set).
    common::ctx()?;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default())).unwrap();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default())).unwrap();
    assert_eq!(device.limits().max_storage_buffers_per_shader_stage, 8);
    Some(Context::from_wgpu(device, queue))
}

#[test]
fn every_kernel_builds_under_the_default_limits() {
    let Some(ctx) = default_limits_ctx() else { return };
    // f32 and packed f16 (a default device has no SHADER_F16).
    let mut results = Vec::new();
    for storage in [Storage::F32, Storage::F16Packed] {
        results.extend([
            ("BatchNormKernel", ctx.kernel_with::<BatchNormKernel>(storage).map(drop)),
            (
                "BatchNormBackwardKernel",
                ctx.kernel_with::<BatchNormBackwardKernel>(storage).map(drop),
            ),
            ("LayerNormKernel", ctx.kernel_with::<LayerNormKernel>(storage).map(drop)),
            (
                "LayerNormBackwardKernel",
                ctx.kernel_with::<LayerNormBackwardKernel>(storage).map(drop),
            ),
            ("DropoutKernel", ctx.kernel_with::<DropoutKernel>(storage).map(drop)),
            (
                "GroupNormKernel",
                ctx.kernel_with::<normdrop::GroupNormKernel>(storage).map(drop),
            ),
            (
                "GroupNormBackwardKernel",
                ctx.kernel_with::<normdrop::GroupNormBackwardKernel>(storage).map(drop),
            ),
            (
                "RmsNormKernel",
                ctx.kernel_with::<normdrop::RmsNormKernel>(storage).map(drop),
            ),
            (
                "RmsNormBackwardKernel",
                ctx.kernel_with::<normdrop::RmsNormBackwardKernel>(storage).map(drop),
            ),
        ]);
    }
    results.extend([
        (
            "CopyKernel",
            ctx.kernel_with::<normdrop::kernels::CopyKernel>(Storage::F32).map(drop),
        ),
        ("SgdKernel", ctx.kernel_with::<SgdKernel>(Storage::F32).map(drop)),
    ]);
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|(what, r)| r.err().map(|e| format!("{what}: {e}")))
        .collect();
    assert!(failed.is_empty(), "under the default limits:\n{}", failed.join("\n"));
}

#[test]
fn batch_norm_trains_under_the_default_limits() {
    let Some(ctx) = default_limits_ctx() else { return };
    let x: Vec<f32> = (0..64).map(|i| (i % 7) as f32 - 3.0 + (i / 16) as f32).collect();
    let xt = Tensor::from_slice(&ctx, &x, &[4, 2, 8]).unwrap();
    let mut bn = BatchNorm::new(&ctx, 2).unwrap();
    let y = bn.forward(&xt).unwrap().to_vec_blocking::<f32>(&ctx).unwrap();
    for c in 0..2 {
        let vals: Vec<f32> = (0..4)
            .flat_map(|n| y[n * 16 + c * 8..n * 16 + c * 8 + 8].to_vec())
            .collect();
        let mean = vals.iter().sum::<f32>() / vals.len() as f32;
        assert!(mean.abs() < 1e-5, "channel {c} mean {mean}");
    }
    assert_eq!(bn.num_batches_tracked_blocking().unwrap(), Some(1));
    let g = bn.backward(&xt).unwrap();
    assert!(g.dx.to_vec_blocking::<f32>(&ctx).unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn layer_norm_runs_and_the_residual_block_is_refused_by_name() {
    let Some(ctx) = default_limits_ctx() else { return };
    let x: Vec<f32> = (0..96).map(|i| ((i * 7) % 11) as f32 * 0.5).collect();
    let xt = Tensor::from_slice(&ctx, &x, &[8, 12]).unwrap();
    let mut ln = LayerNorm::new(&ctx, &[12]).unwrap();
    let y = ln.forward(&xt).unwrap().to_vec_blocking::<f32>(&ctx).unwrap();
    for row in y.chunks(12) {
        let mean = row.iter().sum::<f32>() / 12.0;
        assert!(mean.abs() < 1e-5, "row mean {mean}");
    }
    ln.backward(&xt).unwrap();
    let mut fused = LayerNormDropout::new(&ctx, LayerNormConfig::new(&[12]), DropoutConfig::new(0.25), 7).unwrap();
    fused.forward(&xt).unwrap();
    fused.backward(&xt).unwrap();

    // The residual block binds 9 storage buffers: refused with the limit's name, not a panic.
    let mut block =
        ResidualDropoutLayerNorm::new(&ctx, LayerNormConfig::new(&[12]), DropoutConfig::new(0.25), 7).unwrap();
    match block.forward(&xt, &xt) {
        Err(Error::ExceedsLimit {
            limit_name,
            value,
            limit,
            ..
        }) => {
            assert_eq!(limit_name, "max_storage_buffers_per_shader_stage");
            assert_eq!((value, limit), (9, 8));
        }
        other => panic!("expected ExceedsLimit, got {other:?}"),
    }
}

#[test]
fn a_device_below_a_kernels_needs_gets_an_error_not_a_panic() {
    if common::ctx().is_none() {
        return;
    }
    // 4 storage buffers per stage: BatchNorm's finalize needs 8. Both the embedder's
    // constructor and the context report wgpu's refusal as an error.
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default())).unwrap();
    let limits = wgpu::Limits {
        max_storage_buffers_per_shader_stage: 4,
        ..wgpu::Limits::default()
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_limits: limits,
        ..Default::default()
    }))
    .unwrap();
    let direct = BatchNormKernel::with_storage(&device, Storage::F32);
    assert!(matches!(direct, Err(Error::Validation(_))), "{:?}", direct.map(drop));
    let ctx = Context::from_wgpu(device, queue);
    let cached = ctx.kernel::<BatchNormKernel>();
    assert!(matches!(cached, Err(Error::Validation(_))), "{:?}", cached.map(drop));
}
