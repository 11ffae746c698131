//! Embedding the low-level BatchNorm kernel in a program that owns its wgpu device: record it
//! into your own command encoder, on your own buffers, next to your own passes.
//!
//! Run: `cargo run --example embed_kernel`

use normdrop::wgpu;
use normdrop::{BatchNormBuffers, BatchNormConfig, BatchNormKernel};

fn main() {
    // Your program's device and queue (any wgpu 30 device works).
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default())).expect("an adapter");
    let (device, queue) =
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default())).expect("a device");

    // Once per device: compile. Once per shape: plan (allocates its small uniform and scratch).
    let kernel = BatchNormKernel::new(&device);
    let shape = [4, 2, 8]; // (N, C, L)
    let config = BatchNormConfig::new(2);
    let plan = kernel.plan(&device, &shape, &config).expect("valid shape and config");

    // Your buffers. Inputs and outputs must be distinct buffers; offsets are fine.
    let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let buffer = |label: &str, floats: usize| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (floats * 4) as u64,
            usage: storage,
            mapped_at_creation: false,
        })
    };
    let x: Vec<f32> = (0..64)
        .map(|i| (i % 8) as f32 + if (i / 8) % 2 == 0 { 0.0 } else { 100.0 })
        .collect();
    let (xb, yb) = (buffer("x", 64), buffer("y", 64));
    let (weight, bias) = (buffer("weight", 2), buffer("bias", 2));
    let (running_mean, running_var, count) = (buffer("running_mean", 2), buffer("running_var", 2), buffer("nbt", 2));
    let (save_mean, save_invstd) = (buffer("save_mean", 2), buffer("save_invstd", 2));
    queue.write_buffer(&xb, 0, bytemuck::cast_slice(&x));
    queue.write_buffer(&weight, 0, bytemuck::cast_slice(&[1.0f32, 1.0]));
    queue.write_buffer(&running_var, 0, bytemuck::cast_slice(&[1.0f32, 1.0]));

    // Record into your encoder; nothing is submitted or waited on by normdrop.
    let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("my frame"),
    });
    let args = BatchNormBuffers {
        x: xb.slice(..),
        y: yb.slice(..),
        weight: Some(weight.slice(..)),
        bias: Some(bias.slice(..)),
        running_mean: Some(running_mean.slice(..)),
        running_var: Some(running_var.slice(..)),
        num_batches_tracked: Some(count.slice(..)),
        save_mean: save_mean.slice(..),
        save_invstd: save_invstd.slice(..),
        rng: None,
    };
    plan.encode(&device, &mut encoder, true, &args)
        .expect("buffers fit the plan");

    // Read the running mean back with your own staging buffer.
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("staging"),
        size: 8,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    encoder.copy_buffer_to_buffer(&running_mean, 0, &staging, 0, 8);
    queue.submit([encoder.finish()]);
    staging.slice(..).map_async(wgpu::MapMode::Read, |r| r.expect("map"));
    device.poll(wgpu::PollType::wait_indefinitely()).expect("poll");
    let mean: Vec<f32> = bytemuck::cast_slice(&staging.slice(..).get_mapped_range().expect("mapped")).to_vec();
    // Channel means are 3.5 and 103.5, so one step with momentum 0.1 gives 0.35 and 10.35.
    println!("running_mean after one step: {mean:?}");
}
