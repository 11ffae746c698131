//! Gradient outputs shared by every backward: where gradients go ([`GradTargets`]), what a
//! module's backward returns ([`Grads`], [`ResidualGrads`]), and whether they overwrite or add
//! ([`Accumulate`]).

use crate::tensor::Tensor;

/// Whether gradients overwrite their buffers or are added to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accumulate {
    /// `dx += …` instead of `dx = …`.
    pub dx: bool,
    /// `dγ += …`, `dβ += …` instead of `=` (what a training loop's `.grad` does).
    pub params: bool,
}

/// Gradients of a normalization backward: BatchNorm (γ, β of shape `(C)`) or LayerNorm
/// (γ, β of `normalized_shape`).
#[derive(Clone, Debug)]
pub struct Grads {
    /// `dL/dx`, the input's shape.
    pub dx: Tensor,
    /// `dL/dγ`, `(C)`, when affine.
    pub dweight: Option<Tensor>,
    /// `dL/dβ`, `(C)`, when affine.
    pub dbias: Option<Tensor>,
}

/// Where a backward writes its gradients (f32 tensors of the right shapes). With
/// [`Accumulate`] flags set, gradients are added to what the tensors hold.
#[derive(Clone, Copy, Debug)]
pub struct GradTargets<'a> {
    /// `dL/dx`.
    pub dx: &'a Tensor,
    /// `dL/dγ`; required when the module has γ.
    pub dweight: Option<&'a Tensor>,
    /// `dL/dβ`; required when the module has β.
    pub dbias: Option<&'a Tensor>,
}

/// Gradients of the residual block's backward.
#[derive(Clone, Debug)]
pub struct ResidualGrads {
    /// `dL/dx` (the dropout's input).
    pub dx: Tensor,
    /// `dL/dresidual` (= dL/dh).
    pub dresidual: Tensor,
    /// `dL/dγ`.
    pub dweight: Option<Tensor>,
    /// `dL/dβ`.
    pub dbias: Option<Tensor>,
}
