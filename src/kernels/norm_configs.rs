//! Configurations of RMSNorm and GroupNorm (PyTorch's `nn.RMSNorm` and `nn.GroupNorm`), with
//! their domain checks and shape rules. The f64 CPU references in [`crate::reference`] take
//! them, and so do the GPU kernels (`kernels::rms_norm`, `kernels::group_norm`).

use crate::error::{Error, Result};
use crate::kernels::layer_norm::LayerNormConfig;
use crate::kernels::{check_eps, check_index_limit};

/// PyTorch's default RMSNorm epsilon (`eps = None`): float32's machine epsilon, 2^-23, for
/// f32 and f16 activations alike (PyTorch computes in f32).
pub const RMS_NORM_DEFAULT_EPS: f32 = f32::EPSILON;

/// RMSNorm over the trailing `normalized_shape` dims: `y = x·rsqrt(mean(x²) + eps)·γ`.
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNormConfig {
    /// The trailing dims normalized together; W = their product.
    pub normalized_shape: Vec<usize>,
    /// Added to `mean(x²)`. `None`: [`RMS_NORM_DEFAULT_EPS`], as PyTorch's `eps=None`. A given
    /// value must be finite and > 0.
    pub eps: Option<f32>,
    /// Learnable γ of shape `normalized_shape`. Default `true`.
    pub elementwise_affine: bool,
}

impl RmsNormConfig {
    /// PyTorch's defaults for `normalized_shape` (`eps = None`, γ on).
    pub fn new(normalized_shape: &[usize]) -> Self {
        Self {
            normalized_shape: normalized_shape.to_vec(),
            eps: None,
            elementwise_affine: true,
        }
    }

    /// The epsilon in use.
    pub fn eps(&self) -> f32 {
        self.eps.unwrap_or(RMS_NORM_DEFAULT_EPS)
    }

    /// The shape rules LayerNorm shares (trailing dims, at most 2^31 elements per row).
    pub(crate) fn as_layer_norm(&self) -> LayerNormConfig {
        LayerNormConfig {
            normalized_shape: self.normalized_shape.clone(),
            eps: self.eps(),
            elementwise_affine: self.elementwise_affine,
            bias: false,
        }
    }

    /// Checks every field's domain.
    pub fn validate(&self) -> Result<()> {
        if let Some(eps) = self.eps {
            check_eps(OP_RMS, eps)?;
        }
        self.as_layer_norm().validate().map_err(|e| rename(e, OP_RMS))
    }

    /// `(rows, width)` of an input `shape`, whose trailing dims must equal `normalized_shape`.
    pub fn rows_and_width(&self, shape: &[usize]) -> Result<(u64, u64)> {
        self.as_layer_norm()
            .rows_and_width(shape)
            .map_err(|e| rename(e, OP_RMS))
    }
}

const OP_RMS: &str = "rms_norm";
const OP_GN: &str = "group_norm";

/// `e` with its operation renamed to `op` (a rule shared with LayerNorm reported as RMSNorm's).
pub(crate) fn rename(e: Error, op: &'static str) -> Error {
    match e {
        Error::InvalidArgument { reason, .. } => Error::InvalidArgument { op, reason },
        Error::Shape {
            what, got, expected, ..
        } => Error::Shape {
            op,
            what,
            got,
            expected,
        },
        Error::ExceedsLimit {
            what,
            value,
            limit,
            limit_name,
            ..
        } => Error::ExceedsLimit {
            op,
            what,
            value,
            limit,
            limit_name,
        },
        Error::Buffer { what, reason, .. } => Error::Buffer { op, what, reason },
        Error::BufferTooSmall { what, needed, got, .. } => Error::BufferTooSmall { op, what, needed, got },
        Error::Aliased {
            what, other, reason, ..
        } => Error::Aliased {
            op,
            what,
            other,
            reason,
        },
        Error::WrongDevice { what, detail, .. } => Error::WrongDevice { op, what, detail },
        Error::DType {
            what, got, expected, ..
        } => Error::DType {
            op,
            what,
            got,
            expected,
        },
        other => other,
    }
}

/// GroupNorm on `(N, C, *)`: statistics per sample and group of `C/G` consecutive channels,
/// over those channels and every spatial position (biased variance); affine per channel.
/// InstanceNorm without running statistics is `G = C`.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupNormConfig {
    /// G; must divide `num_channels`.
    pub num_groups: usize,
    /// C.
    pub num_channels: usize,
    /// Added to the variance. Default `1e-5`; must be finite and > 0.
    pub eps: f32,
    /// Learnable per-channel γ and β. Default `true`.
    pub affine: bool,
}

/// The sizes of a GroupNorm call: samples, groups, channels per group, spatial positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupNormDims {
    /// N.
    pub n: usize,
    /// G.
    pub groups: usize,
    /// C / G.
    pub channels_per_group: usize,
    /// ∏ spatial dims (1 for `(N, C)`).
    pub spatial: usize,
}

impl GroupNormDims {
    /// Elements of one (sample, group): `C/G · spatial`.
    pub fn group_len(&self) -> usize {
        self.channels_per_group * self.spatial
    }
}

impl GroupNormConfig {
    /// PyTorch's defaults: eps 1e-5, affine.
    pub fn new(num_groups: usize, num_channels: usize) -> Self {
        Self {
            num_groups,
            num_channels,
            eps: 1e-5,
            affine: true,
        }
    }

    /// InstanceNorm without running statistics over `num_channels` channels (`G = C`; PyTorch's
    /// `nn.InstanceNorm*d` defaults to no affine parameters).
    pub fn instance_norm(num_channels: usize) -> Self {
        Self {
            affine: false,
            ..Self::new(num_channels, num_channels)
        }
    }

    /// Checks every field's domain: `G ≥ 1`, `C % G == 0`, `C ≤ 2^31`, eps finite and > 0.
    pub fn validate(&self) -> Result<()> {
        if self.num_groups == 0 || self.num_channels == 0 {
            return Err(Error::invalid(
                OP_GN,
                format!(
                    "num_groups and num_channels must be at least 1, got {} and {}",
                    self.num_groups, self.num_channels
                ),
            ));
        }
        if !self.num_channels.is_multiple_of(self.num_groups) {
            return Err(Error::invalid(
                OP_GN,
                format!(
                    "num_channels ({}) must be divisible by num_groups ({})",
                    self.num_channels, self.num_groups
                ),
            ));
        }
        check_index_limit(
            OP_GN,
            "num_channels",
            self.num_channels as u64,
            "2^31 channels (u32 indexing)",
        )?;
        check_eps(OP_GN, self.eps)
    }

    /// The sizes of an input `shape` = `(N, C, *)` with `C = num_channels`, no zero dims and at
    /// most 2^31 elements.
    pub fn dims(&self, shape: &[usize]) -> Result<GroupNormDims> {
        self.validate()?;
        if shape.len() < 2 || shape[1] != self.num_channels {
            return Err(Error::shape(
                OP_GN,
                "input",
                shape,
                format!("(N, C, *) with C = num_channels = {}", self.num_channels),
            ));
        }
        let numel = crate::tensor::numel(shape).filter(|&n| n as u64 <= 1 << 31);
        match numel {
            None => Err(Error::ExceedsLimit {
                op: OP_GN,
                what: "input elements",
                value: u64::MAX,
                limit: 1 << 31,
                limit_name: "2^31 elements per call (u32 indexing)",
            }),
            Some(0) => Err(Error::shape(
                OP_GN,
                "input",
                shape,
                "no zero-sized dimension (empty tensors are not supported)",
            )),
            Some(_) => Ok(GroupNormDims {
                n: shape[0],
                groups: self.num_groups,
                channels_per_group: self.num_channels / self.num_groups,
                spatial: shape[2..].iter().product(),
            }),
        }
    }
}
