//! Tuning overrides: the geometry policies the kernels apply by default and the plan options
//! that override them, for benchmarks and tests that drive one path on purpose.
//!
//! **Unstable.** Names, fields and defaults here change whenever a path is added or retuned;
//! nothing a model needs lives here. The kernels pick a path for the device, shape and options
//! by themselves; a plan built with an option a device cannot run returns
//! [`Error::Unsupported`](crate::Error::Unsupported), never a slower or wrong result.

pub use crate::kernels::batch_norm::{
    default_normalize_run, default_reduce_split, BatchNormPlanOptions, ReduceSplit, DEFAULT_STATS_CHUNK,
    MAX_NORMALIZE_RUN, MIN_INVOCATION_CHUNK,
};
pub use crate::kernels::batch_norm_backward::BatchNormBackwardPlanOptions;
pub use crate::kernels::host_threads;
pub use crate::kernels::layer_norm::{default_lanes, LayerNormPlanOptions, ONCHIP_MAX_WIDTH};
