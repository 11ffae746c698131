//! # normdrop
//!
//! GPU kernels for the normalization and regularization layers of neural networks, written in
//! WGSL and run through wgpu on Vulkan, Metal, DX12 and GL, with PyTorch's exact semantics.
//!
//! Three layers, from the bottom:
//!
//! - [`kernels`]: one kernel object per op family. It records dispatches into *your*
//!   `wgpu::CommandEncoder` on *your* buffers, and never creates devices, reads back or waits.
//! - [`nn`]: PyTorch-like modules ([`BatchNorm`]) that own parameters and running statistics
//!   on the GPU, with train/eval mode and safetensors state using PyTorch's key names.
//! - [`reference`](mod@reference): CPU references in f64, used by the tests and by `normdrop check`.
//!
//! ```no_run
//! use normdrop::{BatchNorm, Context, Tensor};
//!
//! let ctx = Context::new_blocking()?;
//! let mut bn = BatchNorm::new(&ctx, 3)?;                    // nn.BatchNorm2d(3)
//! let x = Tensor::from_slice(&ctx, &vec![0.5f32; 2 * 3 * 4 * 4], &[2, 3, 4, 4])?;
//! let y = bn.forward(&x)?;                                   // training mode
//! let y: Vec<f32> = y.to_vec_blocking(&ctx)?;
//! let running_mean: Vec<f32> = bn.running_mean().unwrap().to_vec_blocking(&ctx)?;
//! # Ok::<(), normdrop::Error>(())
//! ```

#![warn(missing_docs)]

pub mod context;
pub mod error;
pub mod grad;
pub mod kernels;
pub mod nn;
pub mod reference;
pub mod rng;
mod shader_source;
pub mod state;
mod storage;
pub mod sync;
pub mod tensor;
pub mod tuning;

pub use context::{Context, ContextOptions, Kernel};
pub use error::{Error, Result};
pub use grad::{Accumulate, GradTargets, Grads, ResidualGrads};
pub use kernels::{
    BatchNormBackwardBuffers, BatchNormBackwardKernel, BatchNormBackwardPlan, BatchNormBuffers, BatchNormConfig,
    BatchNormKernel, BatchNormPlan, DropoutBuffers, DropoutConfig, DropoutKernel, DropoutMode, DropoutPlan,
    DropoutUnit, GroupNormBackwardBuffers, GroupNormBackwardKernel, GroupNormBackwardPlan, GroupNormBuffers,
    GroupNormConfig, GroupNormKernel, GroupNormPlan, GroupNormPlanOptions, LayerNormBackwardBuffers,
    LayerNormBackwardKernel, LayerNormBackwardPlan, LayerNormBuffers, LayerNormConfig, LayerNormFusion,
    LayerNormKernel, LayerNormPlan, RmsNormBackwardBuffers, RmsNormBackwardKernel, RmsNormBackwardPlan, RmsNormBuffers,
    RmsNormConfig, RmsNormKernel, RmsNormPlan, RmsNormResidualBackwardBuffers, RmsNormResidualBuffers, SgdKernel,
    SgdPlan,
};
pub use nn::sgd_step;
/// SyncBatchNorm waits for the other ranks' statistics: native targets only.
#[cfg(not(target_arch = "wasm32"))]
pub use nn::SyncBatchNorm;
pub use nn::{
    BatchNorm, BatchNormDropout, Dropout, Dropout2d, GroupNorm, InstanceNorm, LayerNorm, LayerNormDropout, Mask,
    ResidualDropoutLayerNorm, ResidualDropoutRmsNorm, RmsNorm,
};
pub use state::StateTensor;
pub use storage::Storage;
pub use tensor::{DType, Element, Tensor};
/// The wgpu this crate is built on, re-exported so callers use the same version.
pub use wgpu;
