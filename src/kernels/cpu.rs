//! The passes built only on CPU adapters (lavapipe): the host side of `shaders/cpu/`.
//!
//! A CPU driver runs a subgroup as one SIMD thread, pays a fixed cost per dispatch and loads
//! memory lane by lane (docs/cpu-drivers.md), so on CPU adapters with `SUBGROUP`:
//!
//! - BatchNorm's training forward and its batch-statistics backward run as one dispatch, a
//!   subgroup per channel (`shaders/cpu/batch_norm/`);
//! - LayerNorm's row-block plans hold a row per subgroup in registers
//!   (`shaders/cpu/layer_norm/`).
//!
//! and on every CPU adapter BatchNorm's reductions take one invocation per chunk
//! (`shaders/cpu/batch_norm/*_serial.wgsl`) and LayerNorm one lane per row, the row-block path
//! (`shaders/cpu/layer_norm/forward_blocks.wgsl`, `backward_blocks.wgsl`): those two are built on
//! every device, because a plan may ask for them anywhere.
//!
//! Each function here builds a kernel's CPU-only pipelines, or returns `None` where the device
//! cannot run them; the kernels keep the result beside their GPU pipelines, and a plan takes a
//! CPU pass only through its path choice. Removing this module, `shaders/cpu/` and the
//! `Some(...)` arms that use them leaves every GPU path as it is.

use crate::kernels::layer_norm::{residual_fits, LayerNormFusion};
use crate::kernels::{shader_module, Flag, Pipelines, Storage};

/// Invocations of the subgroup passes' workgroups (`LANES` in their shaders): one subgroup
/// wherever the adapter's smallest subgroup has at least this many.
pub(crate) const SG_LANES: u32 = 8;

/// Triples of column quads per lane the row-per-subgroup pipelines keep in registers (their
/// `TRIPLES` override): a row fits when ⌈W/4 / subgroup size⌉ ≤ 3·T.
pub(crate) const SG_TRIPLES: [u32; 3] = [2, 4, 8];

/// Storage buffers the one-pass-per-channel BatchNorm forward binds (with the dropout's
/// generator state).
const CHANNEL_STORAGE_BINDINGS: u32 = 10;

/// Entry points in `shaders/cpu/batch_norm/forward_channel.wgsl`: the training forward in one
/// pass per channel (`BatchNormPlanOptions::channel_pass`), fused with dropout by `DROPOUT`.
pub(crate) const BATCH_NORM_CHANNEL_FORWARD: &[&str] = &["batch_norm_channel_forward"];

/// Entry points in `shaders/cpu/batch_norm/backward_channel.wgsl`: the backward with batch
/// statistics in one pass per channel (`BatchNormBackwardPlanOptions::channel_pass`), by
/// `DROPOUT` and `ACCUMULATE`.
pub(crate) const BATCH_NORM_CHANNEL_BACKWARD: &[&str] = &["batch_norm_backward_channel"];

/// Entry points in `shaders/cpu/batch_norm/forward_serial.wgsl`: BatchNorm's statistics and
/// finalize with one invocation per (channel, chunk) and per channel (`ReduceSplit::Invocation`).
pub(crate) const BATCH_NORM_SERIAL_FORWARD: &[&str] = &["batch_norm_stats_serial", "batch_norm_finalize_serial"];

/// Entry points in `shaders/cpu/batch_norm/backward_serial.wgsl`: the backward's reduce (by
/// `DROPOUT`, `EVAL` and `PARK`) and finalize with one invocation per (channel, chunk) and per
/// channel.
pub(crate) const BATCH_NORM_SERIAL_BACKWARD: &[&str] = &[
    "batch_norm_backward_reduce_serial",
    "batch_norm_backward_finalize_serial",
];

/// Entry points in `shaders/cpu/group_norm/forward_serial.wgsl` and `backward_serial.wgsl`:
/// GroupNorm's finalize passes with one invocation per group (`ReduceSplit::Invocation`).
pub(crate) const GROUP_NORM_SERIAL_FORWARD: &[&str] = &["group_norm_finalize_serial"];
pub(crate) const GROUP_NORM_SERIAL_BACKWARD: &[&str] = &["group_norm_backward_finalize_serial"];

/// Entry points in `shaders/cpu/layer_norm/forward_blocks.wgsl` (the row-block forward, one
/// lane per row): the plain one by `DROPOUT`, and the residual block's.
pub(crate) const LAYER_NORM_BLOCKS_FORWARD: &[&str] =
    &["layer_norm_block_forward", "layer_norm_block_residual_dropout_forward"];

/// Entry points in `shaders/cpu/layer_norm/backward_blocks.wgsl` (the row-block backward, one
/// lane per row): the dx pass by `DROPOUT` and `ACCUMULATE`, the residual block's by
/// `ACCUMULATE`, and the γ stage that fills the uniform copy of γ they read.
pub(crate) const LAYER_NORM_BLOCKS_BACKWARD: &[&str] = &[
    "layer_norm_backward_block_dx",
    "layer_norm_backward_block_residual_dx",
    "layer_norm_backward_gamma_stage",
];

/// Entry points in `shaders/cpu/layer_norm/forward_rows.wgsl` (the row-per-subgroup forward),
/// by `DROPOUT` and `TRIPLES` (one of [`SG_TRIPLES`]).
pub(crate) const LAYER_NORM_ROWS_FORWARD: &[&str] = &["layer_norm_subgroup_rows_forward"];

/// Entry points in `shaders/cpu/layer_norm/residual_forward_rows.wgsl`: the residual block's
/// row-per-subgroup forward, by `TRIPLES`.
pub(crate) const LAYER_NORM_ROWS_RESIDUAL_FORWARD: &[&str] = &["layer_norm_subgroup_rows_residual_dropout_forward"];

/// Entry points in `shaders/cpu/layer_norm/backward_rows.wgsl` (the row-per-subgroup dx pass),
/// by `DROPOUT`, `ACCUMULATE` and `TRIPLES`.
pub(crate) const LAYER_NORM_ROWS_BACKWARD: &[&str] = &["layer_norm_backward_subgroup_rows_dx"];

/// Entry points in `shaders/cpu/layer_norm/residual_backward_rows.wgsl`: the residual block's
/// row-per-subgroup dx pass, by `ACCUMULATE` and `TRIPLES`.
pub(crate) const LAYER_NORM_ROWS_RESIDUAL_BACKWARD: &[&str] = &["layer_norm_backward_subgroup_rows_residual_dx"];

/// Whether `device` can run the CPU-adapter subgroup passes for `storage`: a CPU adapter (where
/// they pay; GPUs keep their own geometries) with `SUBGROUP` whose smallest subgroup has at
/// least [`SG_LANES`] lanes, and f32 activations (the passes bind only the vec4 variant).
pub(crate) fn cpu_subgroup_passes(device: &wgpu::Device, storage: Storage) -> bool {
    let info = device.adapter_info();
    storage == Storage::F32
        && info.device_type == wgpu::DeviceType::Cpu
        && device.features().contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size >= SG_LANES
}

const ON_OFF: &[u32] = &[0, 1];

/// BatchNorm's one-pass-per-channel training forward: where the subgroup passes run (a GPU
/// would need more than C workgroups of 8) and 10 storage buffers per stage fit.
pub(crate) fn batch_norm_channel_forward(device: &wgpu::Device, storage: Storage) -> Option<Pipelines> {
    let fits = device.limits().max_storage_buffers_per_shader_stage >= CHANNEL_STORAGE_BINDINGS;
    (cpu_subgroup_passes(device, storage) && fits).then(|| {
        let module = shader_module(device, "cpu/batch_norm/forward_channel.wgsl", storage, true);
        let mut p = Pipelines::default();
        p.add_all(device, &module, BATCH_NORM_CHANNEL_FORWARD[0], &["DROPOUT"]);
        p
    })
}

/// BatchNorm's one-pass-per-channel backward with batch statistics (at most 8 storage buffers:
/// no limit beyond the subgroup passes' own).
pub(crate) fn batch_norm_channel_backward(device: &wgpu::Device, storage: Storage) -> Option<Pipelines> {
    cpu_subgroup_passes(device, storage).then(|| {
        let module = shader_module(device, "cpu/batch_norm/backward_channel.wgsl", storage, true);
        let mut p = Pipelines::default();
        p.add_all(
            device,
            &module,
            BATCH_NORM_CHANNEL_BACKWARD[0],
            &["DROPOUT", "ACCUMULATE"],
        );
        p
    })
}

/// Adds BatchNorm's one-invocation-per-chunk statistics (`shaders/cpu/batch_norm/forward_serial.wgsl`,
/// scalar or `vec4`; the finalize from the scalar module) to `p`. Built on every device: a plan
/// may ask for `ReduceSplit::Invocation` anywhere; only CPU adapters take it by default.
pub(crate) fn add_batch_norm_serial_forward(p: &mut Pipelines, device: &wgpu::Device, storage: Storage, vec4: bool) {
    let module = shader_module(device, "cpu/batch_norm/forward_serial.wgsl", storage, vec4);
    p.add_all(device, &module, BATCH_NORM_SERIAL_FORWARD[0], &[]);
    if !vec4 {
        p.add_all(device, &module, BATCH_NORM_SERIAL_FORWARD[1], &[]);
    }
}

/// Adds BatchNorm's one-invocation-per-chunk backward reduce and finalize
/// (`shaders/cpu/batch_norm/backward_serial.wgsl`, scalar or `vec4`; the finalize from the scalar
/// module) to `p`, built on every device as [`add_batch_norm_serial_forward`].
pub(crate) fn add_batch_norm_serial_backward(p: &mut Pipelines, device: &wgpu::Device, storage: Storage, vec4: bool) {
    use crate::kernels::batch_norm_backward::{reduce_wanted, REDUCE_FLAGS};
    let module = shader_module(device, "cpu/batch_norm/backward_serial.wgsl", storage, vec4);
    p.add(
        device,
        &module,
        BATCH_NORM_SERIAL_BACKWARD[0],
        &REDUCE_FLAGS,
        reduce_wanted,
    );
    if !vec4 {
        p.add_all(device, &module, BATCH_NORM_SERIAL_BACKWARD[1], &[]);
    }
}

/// Adds what GroupNorm runs with `ReduceSplit::Invocation`: the one-invocation-per-chunk
/// reductions on its BatchNorm views (the forward statistics with `forward`, else the
/// backward's plain reduce: no dropout, batch statistics off, each (n, c) centred on its
/// group's mean), from BatchNorm's files, scalar or `vec4`; and with the scalar module, the
/// finalize with one invocation per group. Built on every device, as
/// [`add_batch_norm_serial_forward`].
pub(crate) fn add_group_norm_serial(
    p: &mut Pipelines,
    device: &wgpu::Device,
    storage: Storage,
    vec4: bool,
    forward: bool,
) {
    let (file, finalize) = if forward {
        let module = shader_module(device, "cpu/batch_norm/forward_serial.wgsl", storage, vec4);
        p.add_all(device, &module, BATCH_NORM_SERIAL_FORWARD[0], &[]);
        ("cpu/group_norm/forward_serial.wgsl", GROUP_NORM_SERIAL_FORWARD[0])
    } else {
        use crate::kernels::batch_norm_backward::REDUCE_FLAGS;
        let module = shader_module(device, "cpu/batch_norm/backward_serial.wgsl", storage, vec4);
        p.add(device, &module, BATCH_NORM_SERIAL_BACKWARD[0], &REDUCE_FLAGS, |f| {
            f.iter().all(|on| !on)
        });
        ("cpu/group_norm/backward_serial.wgsl", GROUP_NORM_SERIAL_BACKWARD[0])
    };
    if !vec4 {
        p.add_all(device, &shader_module(device, file, storage, false), finalize, &[]);
    }
}

/// Adds LayerNorm's row-block forward (`shaders/cpu/layer_norm/forward_blocks.wgsl`, scalar or
/// `vec4`) to `p`, the residual block's only where its 9 storage buffers fit. Unlike the rest of
/// this module it is built on every device: a plan may ask for one lane per row anywhere
/// (`LayerNormPlanOptions::lanes`); only CPU adapters take it by default.
pub(crate) fn add_layer_norm_blocks_forward(p: &mut Pipelines, device: &wgpu::Device, storage: Storage, vec4: bool) {
    let module = shader_module(device, "cpu/layer_norm/forward_blocks.wgsl", storage, vec4);
    p.add_all(device, &module, LAYER_NORM_BLOCKS_FORWARD[0], &["DROPOUT"]);
    if residual_fits(device) {
        p.add_all(device, &module, LAYER_NORM_BLOCKS_FORWARD[1], &[]);
    }
}

/// Adds LayerNorm's row-block backward (`shaders/cpu/layer_norm/backward_blocks.wgsl`, scalar
/// or `vec4`; the γ stage from the scalar module) to `p`, the residual block's only where its 9
/// storage buffers fit. Built on every device, as [`add_layer_norm_blocks_forward`].
pub(crate) fn add_layer_norm_blocks_backward(p: &mut Pipelines, device: &wgpu::Device, storage: Storage, vec4: bool) {
    let module = shader_module(device, "cpu/layer_norm/backward_blocks.wgsl", storage, vec4);
    p.add_all(
        device,
        &module,
        LAYER_NORM_BLOCKS_BACKWARD[0],
        &["DROPOUT", "ACCUMULATE"],
    );
    if residual_fits(device) {
        p.add_all(device, &module, LAYER_NORM_BLOCKS_BACKWARD[1], &["ACCUMULATE"]);
    }
    if !vec4 {
        p.add_all(device, &module, LAYER_NORM_BLOCKS_BACKWARD[2], &[]);
    }
}

/// LayerNorm's row-per-subgroup forward for every [`SG_TRIPLES`]; the residual block's only
/// where its 9 storage buffers fit.
pub(crate) fn layer_norm_rows_forward(device: &wgpu::Device, storage: Storage, fixed: &[Flag]) -> Option<Pipelines> {
    cpu_subgroup_passes(device, storage).then(|| {
        let mut p = Pipelines::with_fixed(fixed);
        let module = shader_module(device, "cpu/layer_norm/forward_rows.wgsl", storage, true);
        let choices = [("DROPOUT", ON_OFF), ("TRIPLES", &SG_TRIPLES[..])];
        p.add_choices(device, &module, LAYER_NORM_ROWS_FORWARD[0], &choices, |_| true);
        if residual_fits(device) {
            let module = shader_module(device, "cpu/layer_norm/residual_forward_rows.wgsl", storage, true);
            let choices = [("TRIPLES", &SG_TRIPLES[..])];
            p.add_choices(device, &module, LAYER_NORM_ROWS_RESIDUAL_FORWARD[0], &choices, |_| true);
        }
        p
    })
}

/// The row-per-subgroup forward's entry point and constants for `fusion` with `triples` quads
/// per lane.
pub(crate) fn layer_norm_rows_forward_entry(fusion: LayerNormFusion, triples: u32) -> (&'static str, Vec<Flag>) {
    match fusion {
        LayerNormFusion::ResidualDropout(_) => (LAYER_NORM_ROWS_RESIDUAL_FORWARD[0], vec![("TRIPLES", triples)]),
        _ => (
            LAYER_NORM_ROWS_FORWARD[0],
            vec![
                ("DROPOUT", matches!(fusion, LayerNormFusion::Dropout(_)).into()),
                ("TRIPLES", triples),
            ],
        ),
    }
}

/// LayerNorm's row-per-subgroup backward dx pass for every [`SG_TRIPLES`]; the residual
/// block's only where its 9 storage buffers fit.
pub(crate) fn layer_norm_rows_backward(device: &wgpu::Device, storage: Storage, fixed: &[Flag]) -> Option<Pipelines> {
    cpu_subgroup_passes(device, storage).then(|| {
        let mut p = Pipelines::with_fixed(fixed);
        let module = shader_module(device, "cpu/layer_norm/backward_rows.wgsl", storage, true);
        let choices = [
            ("DROPOUT", ON_OFF),
            ("ACCUMULATE", ON_OFF),
            ("TRIPLES", &SG_TRIPLES[..]),
        ];
        p.add_choices(device, &module, LAYER_NORM_ROWS_BACKWARD[0], &choices, |_| true);
        if residual_fits(device) {
            let module = shader_module(device, "cpu/layer_norm/residual_backward_rows.wgsl", storage, true);
            let choices = [("ACCUMULATE", ON_OFF), ("TRIPLES", &SG_TRIPLES[..])];
            p.add_choices(device, &module, LAYER_NORM_ROWS_RESIDUAL_BACKWARD[0], &choices, |_| {
                true
            });
        }
        p
    })
}

/// The row-per-subgroup dx pass's entry point and constants: the residual block's or not, with
/// the dropout's mask on dy (`drop_dy`), adding to dx or not, `triples` quads per lane.
pub(crate) fn layer_norm_rows_backward_entry(
    residual: bool,
    drop_dy: bool,
    accumulate: bool,
    triples: u32,
) -> (&'static str, Vec<Flag>) {
    let (acc, t) = (("ACCUMULATE", accumulate.into()), ("TRIPLES", triples));
    if residual {
        (LAYER_NORM_ROWS_RESIDUAL_BACKWARD[0], vec![acc, t])
    } else {
        (LAYER_NORM_ROWS_BACKWARD[0], vec![("DROPOUT", drop_dy.into()), acc, t])
    }
}
