//! PyTorch-like modules: they own parameters and state on the GPU, track train/eval mode, and
//! submit their work through a [`Context`](crate::Context).

pub mod batch_norm;
pub mod dropout;
pub mod fused;
pub mod layer_norm;

pub use batch_norm::{BatchNorm, BatchNormSaved, GradTargets, Grads, StateTensor};
pub use dropout::{Dropout, Dropout2d, DropoutCall, Mask};
pub use fused::{BatchNormDropout, LayerNormDropout, ResidualDropoutLayerNorm};
pub use layer_norm::{LayerNorm, LayerNormSaved, ResidualGrads};
