//! One error type for the whole crate. Every variant names the operation and what was wrong, so
//! a caller can tell a shape mistake from a device limit from a GPU-side failure.

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in normdrop. Input errors are detected on the host before any
/// GPU work is encoded, so a call that returns one of them has changed nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No adapter matched the request (backend, name). The message lists what was found.
    #[error("no GPU adapter found: {0}")]
    NoAdapter(String),

    /// The adapter refused to create a device with the requested features and limits.
    #[error("could not create a device: {0}")]
    RequestDevice(String),

    /// An argument value is out of its domain (for example `eps <= 0` or `momentum > 1`).
    #[error("{op}: {reason}")]
    InvalidArgument {
        /// The operation, e.g. `"batch_norm"`.
        op: &'static str,
        /// What was wrong, with the offending value.
        reason: String,
    },

    /// A tensor's shape does not fit the operation.
    #[error("{op}: {what} has shape {got:?}, expected {expected}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// Which tensor.
        what: &'static str,
        /// The shape that was passed.
        got: Vec<usize>,
        /// A description of what was expected.
        expected: String,
    },

    /// A caller-supplied buffer (slice) is too small for the shape.
    #[error("{op}: buffer `{what}` holds {got} bytes but the shape needs {needed}")]
    BufferTooSmall {
        /// The operation.
        op: &'static str,
        /// Which buffer.
        what: &'static str,
        /// Bytes required.
        needed: u64,
        /// Bytes available in the slice.
        got: u64,
    },

    /// A caller-supplied buffer cannot be bound as the operation needs (offset alignment, usage,
    /// or aliasing with another argument).
    #[error("{op}: buffer `{what}`: {reason}")]
    Buffer {
        /// The operation.
        op: &'static str,
        /// Which buffer.
        what: &'static str,
        /// What was wrong.
        reason: String,
    },

    /// A tensor, buffer or plan belongs to another device than the one the call runs on: a
    /// tensor made by another [`crate::Context`], a plan built for another device, or a
    /// buffer wgpu reports as created on another device.
    #[error("{op}: `{what}` belongs to another device than the one this call runs on{detail}")]
    WrongDevice {
        /// The operation.
        op: &'static str,
        /// Which argument.
        what: &'static str,
        /// wgpu's report, when wgpu found the mismatch (prefixed with ": "), else empty.
        detail: String,
    },

    /// Two arguments of one call overlap where the call writes: two outputs share bytes, or an
    /// output shares a buffer with an input (WebGPU forbids binding one buffer both read-only
    /// and writable in a dispatch). No op supports working in place unless its docs say so.
    #[error("{op}: `{what}` overlaps `{other}` ({reason}); outputs must be disjoint from every other argument")]
    Aliased {
        /// The operation.
        op: &'static str,
        /// The written argument (of two written ones, the later in the call's argument order).
        what: &'static str,
        /// The argument it overlaps.
        other: &'static str,
        /// Where they overlap.
        reason: String,
    },

    /// A size exceeds a device limit. `limit_name` is the `wgpu::Limits` field.
    #[error("{op}: {what} is {value}, above the device limit {limit_name} = {limit}")]
    ExceedsLimit {
        /// The operation.
        op: &'static str,
        /// What was too large, e.g. `"x (bytes)"`.
        what: &'static str,
        /// The requested size.
        value: u64,
        /// The device's limit.
        limit: u64,
        /// The name of the `wgpu::Limits` field.
        limit_name: &'static str,
    },

    /// A tensor has a dtype the operation does not accept.
    #[error("{op}: {what} has dtype {got}, expected {expected}")]
    DType {
        /// The operation.
        op: &'static str,
        /// Which tensor.
        what: &'static str,
        /// The dtype that was passed.
        got: crate::DType,
        /// The accepted dtype.
        expected: crate::DType,
    },

    /// The operation needs state that is not there yet (e.g. backward before forward).
    #[error("{op}: {reason}")]
    State {
        /// The operation.
        op: &'static str,
        /// What is missing.
        reason: String,
    },

    /// A collective across ranks failed: another rank failed the same call, the ranks
    /// disagree (channels, configuration, mode), the engine reported an error, or a rank did
    /// not arrive in time.
    #[error("{op}: {reason}")]
    Distributed {
        /// The operation.
        op: &'static str,
        /// What went wrong, naming the rank where known.
        reason: String,
    },

    /// The device lacks a feature that was asked for explicitly.
    #[error("{what} is not supported on this device: {reason}")]
    Unsupported {
        /// What was asked for.
        what: String,
        /// Why it cannot be had, and what to use instead.
        reason: String,
    },

    /// wgpu reported a validation error inside an error scope. This is a bug in normdrop or in
    /// the caller's buffers, never expected after the host-side checks.
    #[error("GPU validation error: {0}")]
    Validation(String),

    /// wgpu reported an out-of-memory error inside an error scope.
    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),

    /// wgpu reported an internal error inside an error scope.
    #[error("GPU internal error: {0}")]
    Internal(String),

    /// Mapping a buffer for readback failed, or waiting on the device failed.
    #[error("readback failed: {0}")]
    Readback(String),

    /// A safetensors file could not be read or written, or does not hold what was expected.
    #[error("safetensors: {0}")]
    SafeTensors(String),

    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// [`Error::InvalidArgument`] for `op`.
    pub fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            reason: reason.into(),
        }
    }

    /// [`Error::Shape`]: argument `what` of `op` has shape `got`, not `expected`.
    pub fn shape(op: &'static str, what: &'static str, got: &[usize], expected: impl Into<String>) -> Self {
        Error::Shape {
            op,
            what,
            got: got.to_vec(),
            expected: expected.into(),
        }
    }
}

impl From<wgpu::Error> for Error {
    fn from(e: wgpu::Error) -> Self {
        // wgpu's description is often just "Validation Error"; the cause is in the source chain.
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let text = s.to_string();
            if !detail.contains(text.trim()) {
                detail.push_str(": ");
                detail.push_str(text.trim());
            }
            source = s.source();
        }
        match e {
            wgpu::Error::OutOfMemory { .. } => Error::OutOfMemory(detail),
            wgpu::Error::Validation { .. } => Error::Validation(detail),
            wgpu::Error::Internal { .. } => Error::Internal(detail),
        }
    }
}

impl From<safetensors::SafeTensorError> for Error {
    fn from(e: safetensors::SafeTensorError) -> Self {
        Error::SafeTensors(e.to_string())
    }
}
