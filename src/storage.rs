//! [`Storage`]: how a kernel stores activation tensors. Shared by the library and `build.rs`
//! (compiled into both via `#[path]`), which validates every storage's shader variant.

/// How activation tensors (inputs, outputs and their gradients) are stored in memory; a kernel
/// is compiled once per storage. All arithmetic is f32 whatever the storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Storage {
    /// 32-bit floats.
    F32,
    /// Native 16-bit floats (`enable f16;`, requires `wgpu::Features::SHADER_F16`).
    F16,
    /// 16-bit floats packed in pairs into `u32` words; runs on every device.
    F16Packed,
}

impl Storage {
    /// Every variant.
    pub const ALL: [Storage; 3] = [Storage::F32, Storage::F16, Storage::F16Packed];

    /// Short name, used in labels and test output.
    pub const fn name(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::F16 => "f16",
            Storage::F16Packed => "f16-packed",
        }
    }

    /// Bytes per element in memory.
    pub const fn element_bytes(self) -> u64 {
        match self {
            Storage::F32 => 4,
            Storage::F16 | Storage::F16Packed => 2,
        }
    }
}
