//! PyTorch-like modules: they own parameters and state on the GPU, track train/eval mode, and
//! submit their work through a [`Context`].

pub mod batch_norm;
pub mod dropout;
pub mod fused;
pub mod group_norm;
pub mod layer_norm;
pub mod rms_norm;
#[cfg(not(target_arch = "wasm32"))]
pub mod sync_batch_norm;

pub use batch_norm::{BatchNorm, BatchNormSaved};
pub use dropout::{Dropout, Dropout2d, DropoutCall, Mask};
pub use fused::{BatchNormDropout, LayerNormDropout, ResidualDropoutLayerNorm, ResidualDropoutRmsNorm};
pub use group_norm::{GroupNorm, GroupNormSaved, InstanceNorm};
pub use layer_norm::{LayerNorm, LayerNormSaved};
pub use rms_norm::{RmsNorm, RmsNormSaved};
#[cfg(not(target_arch = "wasm32"))]
pub use sync_batch_norm::SyncBatchNorm;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::kernels::sgd::SgdKernel;
use crate::tensor::{DType, Tensor};

/// One SGD step on the GPU: `param ← param − lr·grad` (f32 tensors of equal shape). Submits;
/// does not wait.
pub fn sgd_step(ctx: &Context, param: &Tensor, grad: &Tensor, lr: f32) -> Result<()> {
    for (what, t) in [("param", param), ("grad", grad)] {
        ctx.check_owns("sgd", what, t)?;
        if t.dtype() != DType::F32 {
            return Err(Error::DType {
                op: "sgd",
                what,
                got: t.dtype(),
                expected: DType::F32,
            });
        }
    }
    if param.shape() != grad.shape() {
        return Err(Error::shape(
            "sgd",
            "grad",
            grad.shape(),
            format!("the parameter's shape {:?}", param.shape()),
        ));
    }
    let plan = ctx.kernel::<SgdKernel>()?.plan(ctx.device(), param.numel(), lr)?;
    let mut encoder = ctx
        .device()
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("sgd") });
    ctx.scoped(|| plan.encode(ctx.device(), &mut encoder, &param.slice(), &grad.slice()))??;
    ctx.submit(encoder)
}
