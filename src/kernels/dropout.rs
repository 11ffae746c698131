//! Dropout and Dropout2d, low level: [`DropoutKernel`] (pipelines, one per device) and
//! [`DropoutPlan`] (one per shape, configuration and unit) encoding into a caller's encoder.
//! The mask is the published function of `(seed, offset, index)` in [`crate::rng`].
//!
//! The generator state lives in a 16-byte storage buffer the caller owns: `(seed lo, seed hi,
//! offset lo, offset hi)` as little-endian u32 words ([`rng_state_bytes`]). Kernels read it;
//! [`DropoutKernel::encode_advance`] increments its offset on the GPU, so several dropout calls
//! recorded into one submission each draw a fresh mask without host round trips.
//!
//! A Dropout2d plan whose channels hold 4 or more elements owns a scratch of ⌈N·C/32⌉ words:
//! each call first writes the channels' keep bits there (`dropout_mask`), then the element
//! pass reads one word per four elements instead of drawing the mask per element group. Calls
//! recorded one after another reuse it in stream order.

use crate::context::Kernel;
use crate::error::{Error, Result};
use crate::kernels::{
    bind_group, bind_ranges, binding, binding_at, check_device, compute_pipeline, fold_workgroups, uniform_buffer,
    vec4_bindable, vec4_module, BindLimits, BindRange, CallArgs, FastDiv, Pipelines, Storage,
};
use crate::rng::DropRule;

const OP: &str = "dropout";
const WORKGROUP: u64 = 256;

/// Entry points in `shaders/dropout/dropout.wgsl` that get a pipeline.
pub(crate) const ENTRY_POINTS: &[&str] = &[
    "dropout_forward",
    "dropout2d_forward",
    "dropout2d_from_bits",
    "dropout_apply_mask",
    "dropout_mask",
    "dropout_rng_advance",
];

/// The forward passes, by mask unit: Dropout, Dropout2d, Dropout2d from channel keep bits.
const FORWARD_ENTRY_POINTS: [&str; 3] = ["dropout_forward", "dropout2d_forward", "dropout2d_from_bits"];

/// Bytes of a generator state buffer.
pub const RNG_STATE_BYTES: u64 = 16;

/// The bytes of a generator state `(seed, offset)`, to write into a state buffer.
pub fn rng_state_bytes(seed: u64, offset: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&seed.to_le_bytes());
    b[8..].copy_from_slice(&offset.to_le_bytes());
    b
}

/// How kept values are scaled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DropoutMode {
    /// PyTorch's: train `y = x·mask/(1 − p)`, eval `y = x`.
    #[default]
    Inverted,
    /// The original paper's: train `y = x·mask`, eval `y = x·(1 − p)`.
    ScaleAtInference,
}

/// Dropout hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutConfig {
    /// Drop probability, in [0, 1]. `p = 0` is the identity; `p = 1` gives zeros in training.
    pub p: f64,
    /// Scaling mode.
    pub mode: DropoutMode,
}

/// Uniform values for one mode (train or eval) of a dropout, shared by every kernel that drops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct DropParams {
    pub threshold: u32,
    pub flags: u32,
    pub scale: f32,
}

/// `DROP_ALL` in `shaders/lib/philox.wgsl`.
const FLAG_DROP_ALL: u32 = 1;
/// `FLAG_ACCUMULATE` in `shaders/dropout/dropout.wgsl` (the forward passes take the
/// `ACCUMULATE` override instead).
const FLAG_ACCUMULATE: u32 = 2;

impl DropoutConfig {
    /// Inverted dropout with probability `p`.
    pub fn new(p: f64) -> Self {
        Self {
            p,
            mode: DropoutMode::Inverted,
        }
    }

    /// Checks `p`.
    pub fn validate(&self) -> Result<()> {
        DropRule::new(self.p).map(|_| ())
    }

    /// The keep rule used in training.
    pub fn rule(&self) -> Result<DropRule> {
        DropRule::new(self.p)
    }

    /// Multiplier of kept elements: training and eval.
    pub fn scale(&self, training: bool) -> f32 {
        match (self.mode, training) {
            (DropoutMode::Inverted, true) if self.p < 1.0 => (1.0 / (1.0 - self.p)) as f32,
            (DropoutMode::Inverted, true) => 0.0,
            (DropoutMode::Inverted, false) => 1.0,
            (DropoutMode::ScaleAtInference, true) => 1.0,
            (DropoutMode::ScaleAtInference, false) => (1.0 - self.p) as f32,
        }
    }

    pub(crate) fn params(&self, training: bool) -> Result<DropParams> {
        let rule = self.rule()?;
        Ok(if training {
            DropParams {
                threshold: rule.threshold,
                flags: if rule.drop_all { FLAG_DROP_ALL } else { 0 },
                scale: self.scale(true),
            }
        } else {
            DropParams {
                threshold: 0,
                flags: 0,
                scale: self.scale(false),
            }
        })
    }
}

/// What one mask bit covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropoutUnit {
    /// Dropout: one bit per element; unit `i` is the flat element index.
    Element,
    /// Dropout2d: one bit per `(n, c)` channel of an `(N, C, *)` input; unit `n·C + c`.
    Channel,
}

/// Mirrors `struct Params` in `shaders/dropout/dropout.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct DropoutParams {
    numel: u32,
    unit_len: u32,
    units: u32,
    threshold: u32,
    flags: u32,
    scale: f32,
    base: u32,
    _pad1: u32,
    div_unit: [u32; 2],
    _pad2: [u32; 2],
}
const _: () = assert!(std::mem::size_of::<DropoutParams>() == 48);

/// Compiled dropout pipelines for one device and activation storage.
#[derive(Clone, Debug)]
pub struct DropoutKernel {
    device: wgpu::Device,
    storage: Storage,
    /// The forward passes (`FORWARD_ENTRY_POINTS`, by `ACCUMULATE`): one entry point per mask
    /// unit, so that no call executes the others' code (CPU drivers predicate every `if`).
    forward: Pipelines,
    /// The same from the vec4 variant (f32 only), for ranges bound as whole 16-byte vectors.
    forward_vec4: Option<Pipelines>,
    apply_mask: wgpu::ComputePipeline,
    mask: wgpu::ComputePipeline,
    advance: wgpu::ComputePipeline,
}

impl Kernel for DropoutKernel {
    fn build(device: &wgpu::Device, storage: Storage) -> Self {
        let module = crate::kernels::shader_module(device, "dropout/dropout.wgsl", storage, false);
        let forward = |module: &wgpu::ShaderModule| {
            let mut p = Pipelines::default();
            for entry in FORWARD_ENTRY_POINTS {
                p.add_all(device, module, entry, &["ACCUMULATE"]);
            }
            p
        };
        Self {
            device: device.clone(),
            storage,
            forward: forward(&module),
            forward_vec4: vec4_module(device, "dropout/dropout.wgsl", storage).map(|m| forward(&m)),
            apply_mask: compute_pipeline(device, &module, "dropout_apply_mask"),
            mask: compute_pipeline(device, &module, "dropout_mask"),
            advance: compute_pipeline(device, &module, "dropout_rng_advance"),
        }
    }
}

/// The element and unit counts of a dropout over `shape`.
pub(crate) fn dropout_units(op: &'static str, shape: &[usize], unit: DropoutUnit) -> Result<(u64, u64, u64)> {
    let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
    let numel = numel.filter(|&n| n <= 1 << 31).ok_or(Error::ExceedsLimit {
        op,
        what: "input elements",
        value: u64::MAX,
        limit: 1 << 31,
        limit_name: "2^31 elements per call (u32 indexing)",
    })?;
    if numel == 0 {
        return Err(Error::shape(
            op,
            "input",
            shape,
            "no zero-sized dimension (empty tensors are not supported)",
        ));
    }
    Ok(match unit {
        DropoutUnit::Element => (numel, 1, numel),
        DropoutUnit::Channel => {
            if shape.len() < 2 {
                return Err(Error::shape(op, "input", shape, "rank >= 2: (N, C, *) for Dropout2d"));
            }
            let unit_len: u64 = shape[2..].iter().map(|&d| d as u64).product();
            (numel, unit_len, numel / unit_len)
        }
    })
}

storage_constructors!(DropoutKernel, "x, y, dy, dx");

impl DropoutKernel {
    /// A plan for inputs of `shape`. `unit` picks Dropout or Dropout2d.
    pub fn plan(
        &self,
        device: &wgpu::Device,
        shape: &[usize],
        config: &DropoutConfig,
        unit: DropoutUnit,
    ) -> Result<DropoutPlan> {
        check_device(OP, &self.device, device)?;
        config.validate()?;
        let (numel, unit_len, units) = dropout_units(OP, shape, unit)?;
        let limits = BindLimits::of(device);
        let eb = self.storage.element_bytes();
        // Ranges start at multiples of 4 elements: one Philox call covers 4 elements.
        let ranges = bind_ranges(OP, "4 elements", numel, eb, &limits, 4)?;
        limits.check_size(OP, "packed mask in bytes", units.div_ceil(32) * 4)?;
        let uniform = |range: &BindRange, training: bool, accumulate: bool| -> Result<wgpu::Buffer> {
            let d = config.params(training)?;
            let params = DropoutParams {
                numel: range.count as u32,
                unit_len: unit_len as u32,
                units: units as u32,
                threshold: d.threshold,
                flags: d.flags | if accumulate { FLAG_ACCUMULATE } else { 0 },
                scale: d.scale,
                base: range.start as u32,
                _pad1: 0,
                div_unit: FastDiv::new(unit_len).words(),
                _pad2: [0; 2],
            };
            Ok(uniform_buffer(device, "dropout params", &params))
        };
        // dropout_forward takes three quads per invocation (three interleaved Philox calls),
        // dropout2d_forward and dropout2d_from_bits four.
        let quads_per_invocation = match unit {
            DropoutUnit::Element => 3,
            DropoutUnit::Channel => 4,
        };
        let mut parts = Vec::with_capacity(ranges.len());
        for range in &ranges {
            parts.push(DropoutRange {
                range: *range,
                uniforms: [
                    uniform(range, false, false)?,
                    uniform(range, true, false)?,
                    uniform(range, false, true)?,
                    uniform(range, true, true)?,
                ],
                apply_groups: fold_workgroups(OP, range.count.div_ceil(WORKGROUP), limits.max_workgroups_per_dim)?,
                forward_groups: fold_workgroups(
                    OP,
                    range
                        .count
                        .div_ceil(4)
                        .div_ceil(quads_per_invocation)
                        .div_ceil(WORKGROUP),
                    limits.max_workgroups_per_dim,
                )?,
            });
        }
        Ok(DropoutPlan {
            kernel: self.clone(),
            config: *config,
            shape: shape.to_vec(),
            unit,
            numel,
            units,
            limits,
            ranges: parts,
            mask_groups: fold_workgroups(OP, units.div_ceil(32 * WORKGROUP), limits.max_workgroups_per_dim)?,
            // Dropout2d with channels of 4 or more elements draws each channel's decision once,
            // into these bits, and the element pass reads them (a quad spans at most two
            // channels); shorter channels keep the direct path.
            channel_bits: (unit == DropoutUnit::Channel && unit_len >= 4).then(|| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("dropout2d channel keep bits"),
                    size: units.div_ceil(32) * 4,
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                })
            }),
        })
    }

    /// Records `offset += 1` on the generator state in `rng` (16 bytes, see
    /// [`rng_state_bytes`]).
    pub fn encode_advance(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        rng: &wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        check_device(OP, &self.device, device)?;
        let limits = BindLimits::of(device);
        let mut args = CallArgs::new(OP, &limits);
        args.write("rng", rng, RNG_STATE_BYTES)?;
        args.record(device, encoder, "rng advance", || {
            let group = bind_group(
                device,
                "dropout_rng_advance",
                &self.advance,
                &[(3, binding(rng, RNG_STATE_BYTES))],
            );
            Ok(vec![(&self.advance, group, (1, 1))])
        })
    }
}

/// The buffers of one dropout call (`numel` elements each, stored as the kernel's
/// [`Storage`]; distinct buffers).
#[derive(Clone, Debug)]
pub struct DropoutBuffers<'a> {
    /// Input.
    pub x: wgpu::BufferSlice<'a>,
    /// Output, same shape.
    pub y: wgpu::BufferSlice<'a>,
    /// Generator state, 16 bytes: `(seed, offset)` as little-endian u64s.
    pub rng: wgpu::BufferSlice<'a>,
}

/// A dropout for one shape, configuration and unit.
#[derive(Debug)]
pub struct DropoutPlan {
    kernel: DropoutKernel,
    config: DropoutConfig,
    shape: Vec<usize>,
    unit: DropoutUnit,
    numel: u64,
    units: u64,
    limits: BindLimits,
    /// One per storage binding's worth of elements (one unless the tensor exceeds
    /// `max_storage_buffer_binding_size`).
    ranges: Vec<DropoutRange>,
    mask_groups: (u32, u32),
    /// Dropout2d's channel keep bits, when channels hold 4 or more elements.
    channel_bits: Option<wgpu::Buffer>,
}

/// The uniforms and workgroup counts of one range of a dropout plan.
#[derive(Debug)]
struct DropoutRange {
    range: BindRange,
    /// Indexed by `training + 2·accumulate`.
    uniforms: [wgpu::Buffer; 4],
    forward_groups: (u32, u32),
    apply_groups: (u32, u32),
}

impl DropoutRange {
    fn uniform(&self, training: bool, accumulate: bool) -> wgpu::BindingResource<'_> {
        self.uniforms[usize::from(training) + 2 * usize::from(accumulate)].as_entire_binding()
    }
}

impl DropoutPlan {
    /// How the activations this plan reads and writes are stored (its kernel's storage).
    pub fn storage(&self) -> Storage {
        self.kernel.storage
    }

    /// The input shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The configuration.
    pub fn config(&self) -> &DropoutConfig {
        &self.config
    }

    /// Mask units: elements (Dropout) or `N·C` channels (Dropout2d).
    pub fn units(&self) -> u64 {
        self.units
    }

    /// u32 words of the packed mask: `⌈units / 32⌉`.
    pub fn mask_words(&self) -> u64 {
        self.units.div_ceil(32)
    }

    /// Records `y = x·m` (see `shaders/dropout/dropout.wgsl`). Does not advance the generator.
    pub fn encode(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        training: bool,
        b: &DropoutBuffers<'_>,
    ) -> Result<()> {
        self.encode_map(device, encoder, training, false, b)
    }

    /// Records the backward `dx = dy·m` with the forward's generator state in `b.rng`
    /// (`b.x` = dy, `b.y` = dx). With `accumulate`, `dx += dy·m`.
    pub fn encode_backward(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        training: bool,
        accumulate: bool,
        b: &DropoutBuffers<'_>,
    ) -> Result<()> {
        self.encode_map(device, encoder, training, accumulate, b)
    }

    fn encode_map(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        training: bool,
        accumulate: bool,
        b: &DropoutBuffers<'_>,
    ) -> Result<()> {
        let k = &self.kernel;
        check_device(OP, &k.device, device)?;
        let bytes = self.numel * k.storage.element_bytes();
        let mut args = CallArgs::new(OP, &self.limits);
        args.read_ranged("x", &b.x, bytes)?;
        args.write_ranged("y", &b.y, bytes)?;
        // rng is declared read_write in dropout/dropout.wgsl (dropout_rng_advance writes it), so
        // it counts as written here.
        args.write("rng", &b.rng, RNG_STATE_BYTES)?;
        args.check_aliasing()?;
        let eb = k.storage.element_bytes();
        let unit = match (self.unit, &self.channel_bits) {
            (DropoutUnit::Element, _) => 0,
            (DropoutUnit::Channel, None) => 1,
            (DropoutUnit::Channel, Some(_)) => 2,
        };
        args.record(device, encoder, "dropout", || {
            let mut dispatches = Vec::with_capacity(self.ranges.len() + 1);
            if let Some(bits) = &self.channel_bits {
                let group = bind_group(
                    device,
                    "dropout2d channel bits",
                    &k.mask,
                    &[
                        (0, self.ranges[0].uniform(training, false)),
                        (3, binding(&b.rng, RNG_STATE_BYTES)),
                        (4, bits.as_entire_binding()),
                    ],
                );
                dispatches.push((&k.mask, group, self.mask_groups));
            }
            for c in &self.ranges {
                let (at, len) = (c.range.start * eb, c.range.count * eb);
                // One 16-byte access per four elements where the range allows it.
                let pipelines = match &k.forward_vec4 {
                    Some(v) if vec4_bindable(&[&b.x, &b.y], at, len) => v,
                    _ => &k.forward,
                };
                let pipeline = pipelines.get(FORWARD_ENTRY_POINTS[unit], &[("ACCUMULATE", accumulate.into())])?;
                let mut entries = vec![
                    (0, c.uniform(training, accumulate)),
                    (1, binding_at(&b.x, at, len)),
                    (2, binding_at(&b.y, at, len)),
                ];
                match &self.channel_bits {
                    Some(bits) => entries.push((4, bits.as_entire_binding())),
                    None => entries.push((3, binding(&b.rng, RNG_STATE_BYTES))),
                }
                let group = bind_group(device, "dropout_forward", pipeline, &entries);
                dispatches.push((pipeline, group, c.forward_groups));
            }
            Ok(dispatches)
        })
    }

    /// Records the packed keep mask for the current generator state into `mask`
    /// ([`DropoutPlan::mask_words`] u32 words, unit `u` in bit `u % 32` of word `u / 32`). In
    /// eval every bit is set.
    pub fn encode_mask(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        training: bool,
        rng: &wgpu::BufferSlice<'_>,
        mask: &wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        let k = &self.kernel;
        check_device(OP, &k.device, device)?;
        let mut args = CallArgs::new(OP, &self.limits);
        args.write("rng", rng, RNG_STATE_BYTES)?;
        args.write("mask", mask, self.mask_words() * 4)?;
        args.check_aliasing()?;
        args.record(device, encoder, "dropout mask", || {
            let group = bind_group(
                device,
                "dropout_mask",
                &k.mask,
                &[
                    (0, self.ranges[0].uniform(training, false)),
                    (3, binding(rng, RNG_STATE_BYTES)),
                    (4, binding(mask, self.mask_words() * 4)),
                ],
            );
            Ok(vec![(&k.mask, group, self.mask_groups)])
        })
    }

    /// Records the backward from a stored packed mask (as written by
    /// [`DropoutPlan::encode_mask`]): `dx = dy·m`, or `dx += dy·m` with `accumulate`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_backward_from_mask(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        training: bool,
        accumulate: bool,
        dy: &wgpu::BufferSlice<'_>,
        dx: &wgpu::BufferSlice<'_>,
        mask: &wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        let k = &self.kernel;
        check_device(OP, &k.device, device)?;
        let eb = k.storage.element_bytes();
        let bytes = self.numel * eb;
        let mut args = CallArgs::new(OP, &self.limits);
        args.read_ranged("dy", dy, bytes)?;
        args.write_ranged("dx", dx, bytes)?;
        // bound read_write in the shader's layout (dropout_mask writes it)
        args.write("mask", mask, self.mask_words() * 4)?;
        args.check_aliasing()?;
        args.record(device, encoder, "dropout from mask", || {
            Ok(self
                .ranges
                .iter()
                .map(|c| {
                    let (at, len) = (c.range.start * eb, c.range.count * eb);
                    let group = bind_group(
                        device,
                        "dropout_apply_mask",
                        &k.apply_mask,
                        &[
                            (0, c.uniform(training, accumulate)),
                            (1, binding_at(dy, at, len)),
                            (2, binding_at(dx, at, len)),
                            (4, binding(mask, self.mask_words() * 4)),
                        ],
                    );
                    (&k.apply_mask, group, c.apply_groups)
                })
                .collect())
        })
    }

    /// How many dispatch ranges each call records: 1 unless the tensor is larger than one
    /// storage binding (`max_storage_buffer_binding_size`).
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }

    /// The unit of this plan.
    pub fn unit(&self) -> DropoutUnit {
        self.unit
    }
}
