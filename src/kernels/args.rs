//! What every encode checks about its arguments, in one place, before anything is recorded:
//!
//! - the device: the one passed to `plan`/`encode` must be the one the kernel was built for
//!   ([`check_device`]);
//! - each buffer: usage, offset alignment, size, binding limit ([`CallArgs::read`] and
//!   friends, through [`BindLimits`]);
//! - aliasing over all the buffers of the call ([`CallArgs::check_aliasing`]): written ranges
//!   are disjoint from each other, and no written buffer is also read;
//! - what only wgpu can see (a buffer created on another device, a destroyed buffer): the bind
//!   groups are created inside error scopes and the passes are recorded only when wgpu accepted
//!   every one ([`CallArgs::record`]); a refusal is traced back to the argument that caused it.

use crate::context::scoped_on;
use crate::error::{Error, Result};
use crate::kernels::{record, BindLimits, Dispatch};

/// Checks that `device`, passed to a call of `op`, is the device the kernel or plan was built
/// for (`built_for`). wgpu compares device handles by their index in the instance, which is
/// exact within one `wgpu::Instance` (every context normdrop creates shares one).
pub(crate) fn check_device(op: &'static str, built_for: &wgpu::Device, device: &wgpu::Device) -> Result<()> {
    if built_for == device {
        Ok(())
    } else {
        Err(Error::WrongDevice {
            op,
            what: "device",
            detail: ": the kernel or plan was built for another device".into(),
        })
    }
}

/// Binds 4 bytes of `slice` on `device` inside error scopes, to learn whether wgpu accepts the
/// buffer there: [`Error::WrongDevice`] when wgpu reports that it belongs to another device,
/// [`Error::Buffer`] with wgpu's words for any other refusal (a destroyed buffer).
pub(crate) fn probe_binding(
    device: &wgpu::Device,
    op: &'static str,
    what: &'static str,
    slice: &wgpu::BufferSlice<'_>,
) -> Result<()> {
    let outcome = scoped_on(device, || {
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("normdrop probe"),
            entries: &[wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: true },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            }],
        });
        let _probe = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("normdrop probe"),
            layout: &layout,
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: slice.buffer(),
                    offset: slice.offset(),
                    size: std::num::NonZeroU64::new(4),
                }),
            }],
        });
    });
    match outcome {
        Ok(()) => Ok(()),
        Err(Error::Validation(msg)) if msg.contains("doesn't match") => Err(Error::WrongDevice {
            op,
            what,
            detail: format!(": {msg}"),
        }),
        Err(e) => Err(Error::Buffer {
            op,
            what,
            reason: format!("wgpu refused to bind it: {e}"),
        }),
    }
}

/// One buffer argument of a call.
struct Arg<'s, 'a> {
    what: &'static str,
    slice: &'s wgpu::BufferSlice<'a>,
    /// Bytes the call binds from the slice's offset (rounded up to 4 for the overlap test).
    bytes: u64,
    write: bool,
}

/// The buffer arguments of one call, checked one by one as they are added and together by
/// [`CallArgs::check_aliasing`].
pub(crate) struct CallArgs<'s, 'a> {
    op: &'static str,
    limits: BindLimits,
    args: Vec<Arg<'s, 'a>>,
}

impl<'s, 'a> CallArgs<'s, 'a> {
    /// No arguments yet, for a call of `op` on a device with `limits`.
    pub(crate) fn new(op: &'static str, limits: &BindLimits) -> Self {
        Self {
            op,
            limits: *limits,
            args: Vec::with_capacity(12),
        }
    }

    /// Checks `slice` for `bytes` (whole in one storage binding unless `ranged`: bound in the
    /// plan's binding ranges) and adds it as read or written.
    fn add(
        &mut self,
        what: &'static str,
        slice: &'s wgpu::BufferSlice<'a>,
        bytes: u64,
        write: bool,
        ranged: bool,
    ) -> Result<()> {
        if ranged {
            self.limits.check_ranged(self.op, what, slice, bytes)?;
        } else {
            self.limits.check(self.op, what, slice, bytes)?;
        }
        self.args.push(Arg {
            what,
            slice,
            bytes,
            write,
        });
        Ok(())
    }

    /// An input bound whole: `bytes` from the slice's offset, within one storage binding.
    pub(crate) fn read(&mut self, what: &'static str, slice: &'s wgpu::BufferSlice<'a>, bytes: u64) -> Result<()> {
        self.add(what, slice, bytes, false, false)
    }

    /// An input the plan binds in its binding ranges (may exceed one storage binding).
    pub(crate) fn read_ranged(
        &mut self,
        what: &'static str,
        slice: &'s wgpu::BufferSlice<'a>,
        bytes: u64,
    ) -> Result<()> {
        self.add(what, slice, bytes, false, true)
    }

    /// An output (or an argument read and written) bound whole.
    pub(crate) fn write(&mut self, what: &'static str, slice: &'s wgpu::BufferSlice<'a>, bytes: u64) -> Result<()> {
        self.add(what, slice, bytes, true, false)
    }

    /// An output bound in the plan's binding ranges.
    pub(crate) fn write_ranged(
        &mut self,
        what: &'static str,
        slice: &'s wgpu::BufferSlice<'a>,
        bytes: u64,
    ) -> Result<()> {
        self.add(what, slice, bytes, true, true)
    }

    /// Every written range is disjoint from every other argument's range, and no buffer is both
    /// read and written (WebGPU refuses a buffer bound read-only and writable in one dispatch,
    /// and the kernels read and write in an order that would make any overlap a race).
    /// Inputs may share a buffer and overlap. [`Error::Aliased`] names the written argument and
    /// the one it meets.
    pub(crate) fn check_aliasing(&self) -> Result<()> {
        for (i, a) in self.args.iter().enumerate() {
            for b in &self.args[..i] {
                if !(a.write || b.write) || a.slice.buffer() != b.slice.buffer() {
                    continue;
                }
                let range = |x: &Arg<'_, '_>| (x.slice.offset(), x.slice.offset() + x.bytes.div_ceil(4).max(1) * 4);
                let ((a0, a1), (b0, b1)) = (range(a), range(b));
                let reason = if a.write && b.write {
                    if a1 <= b0 || b1 <= a0 {
                        continue;
                    }
                    format!(
                        "both are written, at bytes {a0}..{a1} and {b0}..{b1} of one buffer",
                        a0 = a0.max(b0),
                        a1 = a1.min(b1)
                    )
                } else {
                    "one buffer is read through one and written through the other".to_string()
                };
                // Name the written argument first (the later one when both are written).
                let (what, other) = if a.write { (a.what, b.what) } else { (b.what, a.what) };
                return Err(Error::Aliased {
                    op: self.op,
                    what,
                    other,
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Builds the call's dispatches (their bind groups) inside wgpu error scopes on `device`
    /// and records them into `encoder` as one compute pass named `label` only when wgpu accepted
    /// every bind group. A refusal is traced back to the argument wgpu refused
    /// ([`probe_binding`]); nothing is recorded then.
    pub(crate) fn record<'p>(
        &self,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        label: &str,
        build: impl FnOnce() -> Result<Vec<Dispatch<'p>>>,
    ) -> Result<()> {
        let dispatches = match scoped_on(device, build) {
            Ok(built) => built?,
            Err(refused) => {
                for a in &self.args {
                    probe_binding(device, self.op, a.what, a.slice)?;
                }
                return Err(refused);
            }
        };
        record(encoder, label, &dispatches);
        Ok(())
    }
}
