//! The bad-input catalogue: every way of misusing the public API that we know of, each case
//! asserting the exact error variant, that the message names the operation and the argument,
//! and, for module calls, that all observable state is unchanged (running statistics,
//! `num_batches_tracked`, saved statistics, parameters, the generator and the last call), and
//! that the module afterwards computes exactly what a fresh module computes.
//!
//! Sections (each asserts its own minimum count): tensors and configurations, modules, the
//! low-level kernels (device identity, every aliasing pair of every kernel, buffer checks),
//! and state files. `cli/tests/cli.rs` holds the command's cases.

mod common;

use normdrop::kernels::RNG_STATE_BYTES;
use normdrop::wgpu;
use normdrop::{
    Accumulate, BatchNorm, BatchNormBackwardBuffers, BatchNormBackwardKernel, BatchNormBuffers, BatchNormConfig,
    BatchNormDropout, BatchNormKernel, Context, DType, Dropout, Dropout2d, DropoutBuffers, DropoutConfig,
    DropoutKernel, DropoutUnit, Error, GradTargets, GroupNorm, GroupNormConfig, InstanceNorm, LayerNorm,
    LayerNormBackwardBuffers, LayerNormBackwardKernel, LayerNormBuffers, LayerNormConfig, LayerNormDropout,
    LayerNormFusion, LayerNormKernel, ResidualDropoutLayerNorm, RmsNorm, SgdKernel, Tensor,
};

/// The variant's name, for comparing errors by kind.
fn variant(e: &Error) -> &'static str {
    match e {
        Error::InvalidArgument { .. } => "InvalidArgument",
        Error::Shape { .. } => "Shape",
        Error::BufferTooSmall { .. } => "BufferTooSmall",
        Error::Buffer { .. } => "Buffer",
        Error::WrongDevice { .. } => "WrongDevice",
        Error::Aliased { .. } => "Aliased",
        Error::ExceedsLimit { .. } => "ExceedsLimit",
        Error::DType { .. } => "DType",
        Error::State { .. } => "State",
        Error::Distributed { .. } => "Distributed",
        Error::Unsupported { .. } => "Unsupported",
        Error::Validation(_) => "Validation",
        Error::SafeTensors(_) => "SafeTensors",
        Error::Io { .. } => "Io",
        _ => "other",
    }
}

/// The cases of one section; failures are collected and reported together.
struct Catalogue {
    section: &'static str,
    count: usize,
    failures: Vec<String>,
}

impl Catalogue {
    fn new(section: &'static str) -> Self {
        Self {
            section,
            count: 0,
            failures: Vec::new(),
        }
    }

    /// `r` is an error of `kind` whose message contains every string of `names` (the operation
    /// and the argument).
    fn case<T>(&mut self, name: &str, r: Result<T, Error>, kind: &str, names: &[&str]) {
        self.count += 1;
        match r {
            Ok(_) => self.failures.push(format!("{name}: accepted, expected {kind}")),
            Err(e) => {
                let msg = e.to_string();
                if variant(&e) != kind {
                    self.failures
                        .push(format!("{name}: {} ({msg}), expected {kind}", variant(&e)));
                } else if let Some(missing) = names.iter().find(|n| !msg.contains(*n)) {
                    self.failures
                        .push(format!("{name}: message does not name `{missing}`: {msg}"));
                }
            }
        }
    }

    /// A module case: `call` fails as [`Catalogue::case`] says and `snapshot` reads the same
    /// before and after.
    fn module_case<M, T>(
        &mut self,
        name: &str,
        module: &mut M,
        snapshot: impl Fn(&M) -> Snapshot,
        call: impl FnOnce(&mut M) -> Result<T, Error>,
        kind: &str,
        names: &[&str],
    ) {
        let before = snapshot(module);
        let r = call(module);
        self.case(name, r, kind, names);
        let after = snapshot(module);
        if before != after {
            self.failures.push(format!(
                "{name}: state changed:\n  before {before:?}\n  after  {after:?}"
            ));
        }
    }

    fn finish(self, at_least: usize) {
        assert!(
            self.failures.is_empty(),
            "{} of {} {} cases failed:\n{}",
            self.failures.len(),
            self.count,
            self.section,
            self.failures.join("\n")
        );
        assert!(
            self.count >= at_least,
            "{}: {} cases, expected at least {at_least}",
            self.section,
            self.count
        );
        eprintln!("{}: {} cases", self.section, self.count);
    }
}

/// `cases!(cat; name => result, kind, [names…]; …)`: one [`Catalogue::case`] per line.
macro_rules! cases {
    ($cat:ident; $($name:expr => $result:expr, $kind:expr, [$($n:expr),* $(,)?];)*) => {
        $($cat.case(&$name, $result, $kind, &[$($n),*]);)*
    };
}

/// `module_cases!(cat, module, snapshot; name => call, kind, [names…]; …)`: one
/// [`Catalogue::module_case`] per line.
macro_rules! module_cases {
    ($cat:ident, $m:expr, $snap:expr; $($name:expr => $call:expr, $kind:expr, [$($n:expr),* $(,)?];)*) => {
        $($cat.module_case(&$name, $m, $snap, $call, $kind, &[$($n),*]);)*
    };
}

/// Everything observable about a module, as bits (so NaN compares equal to itself).
type Snapshot = Vec<(String, Vec<u64>)>;

fn bits(ctx: &Context, t: &Tensor) -> Vec<u64> {
    t.to_f64_blocking(ctx).unwrap().iter().map(|v| v.to_bits()).collect()
}

fn push(s: &mut Snapshot, ctx: &Context, name: &str, t: Option<&Tensor>) {
    if let Some(t) = t {
        let mut v = bits(ctx, t);
        v.extend(t.shape().iter().map(|&d| d as u64));
        s.push((name.into(), v));
    }
}

fn bn_snapshot(ctx: &Context, bn: &BatchNorm) -> Snapshot {
    let mut s = Snapshot::new();
    push(&mut s, ctx, "weight", bn.weight());
    push(&mut s, ctx, "bias", bn.bias());
    push(&mut s, ctx, "running_mean", bn.running_mean());
    push(&mut s, ctx, "running_var", bn.running_var());
    let n = bn.num_batches_tracked_blocking().unwrap();
    s.push(("num_batches_tracked".into(), n.into_iter().collect()));
    s.push(("training".into(), vec![u64::from(bn.is_training())]));
    if let Some(saved) = bn.saved() {
        push(&mut s, ctx, "saved.mean", Some(&saved.mean));
        push(&mut s, ctx, "saved.invstd", Some(&saved.invstd));
        s.push(("saved.shape".into(), saved.shape.iter().map(|&d| d as u64).collect()));
        s.push(("saved.training".into(), vec![u64::from(saved.training)]));
        let d = saved.dropout.map(|(_, seed, offset)| vec![seed, offset]);
        s.push(("saved.dropout".into(), d.unwrap_or_default()));
    }
    s
}

fn ln_snapshot(ctx: &Context, ln: &LayerNorm) -> Snapshot {
    let mut s = Snapshot::new();
    push(&mut s, ctx, "weight", ln.weight());
    push(&mut s, ctx, "bias", ln.bias());
    if let Some(saved) = ln.saved() {
        push(&mut s, ctx, "saved.mean", Some(&saved.mean));
        push(&mut s, ctx, "saved.rstd", Some(&saved.rstd));
        s.push(("saved.shape".into(), saved.shape.iter().map(|&d| d as u64).collect()));
        let d = saved
            .dropout_state
            .map(|(seed, offset, t)| vec![seed, offset, u64::from(t)]);
        s.push(("saved.dropout".into(), d.unwrap_or_default()));
    }
    s
}

fn generator(state: (u64, u64), last: Option<normdrop::nn::DropoutCall>) -> (String, Vec<u64>) {
    let mut v = vec![state.0, state.1];
    if let Some(c) = last {
        v.extend([c.seed, c.offset, u64::from(c.training)]);
    }
    ("generator".into(), v)
}

fn dropout_snapshot(d: &Dropout) -> Snapshot {
    vec![
        generator(d.state(), d.last_call()),
        ("training".into(), vec![u64::from(d.is_training())]),
    ]
}

/// Dropout or Dropout2d, driven through `Dropout`'s API.
enum AnyDropout {
    One(Dropout),
    Two(Dropout2d),
}

impl std::ops::Deref for AnyDropout {
    type Target = Dropout;
    fn deref(&self) -> &Dropout {
        match self {
            AnyDropout::One(d) => d,
            AnyDropout::Two(d) => d,
        }
    }
}

impl std::ops::DerefMut for AnyDropout {
    fn deref_mut(&mut self) -> &mut Dropout {
        match self {
            AnyDropout::One(d) => d,
            AnyDropout::Two(d) => d,
        }
    }
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    common::Rng::new(seed).normal_vec(n, 0.5, 2.0)
}

fn tensor(ctx: &Context, shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_slice(ctx, &data(shape.iter().product(), seed), shape).unwrap()
}

fn f32s(ctx: &Context, t: &Tensor) -> Vec<u32> {
    t.to_vec_blocking::<f32>(ctx)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// A second context on the default adapter: its tensors, plans and buffers are foreign to the
/// shared one.
fn other_ctx() -> Context {
    Context::new_blocking().expect("the default adapter opens a second time")
}

#[test]
fn tensors_and_configs() {
    let ctx = gpu!();
    let other = other_ctx();
    let mut cat = Catalogue::new("tensors and configurations");
    let huge = 1usize << 62;

    // Tensors.
    cases!(cat;
        "zeros, shape overflows" => Tensor::zeros(&ctx, &[3, huge], DType::F32), "Shape", ["tensor", "shape"];
        "zeros, bytes overflow" => Tensor::zeros(&ctx, &[huge], DType::F32), "Shape", ["tensor", "shape"];
        "zeros, above max_buffer_size" => Tensor::zeros(&ctx, &[1 << 20, 1 << 20], DType::F32), "ExceedsLimit", ["tensor", "max_buffer_size"];
        "full, above max_buffer_size" => Tensor::full(&ctx, &[1 << 40], 1.0, DType::F32), "ExceedsLimit", ["tensor"];
        "full f16, overflow" => Tensor::full(&ctx, &[huge, 8], 1.0, DType::F16), "Shape", ["tensor", "shape"];
        "from_slice, length" => Tensor::from_slice(&ctx, &[1.0f32; 5], &[2, 3]), "Shape", ["tensor", "shape"];
        "from_slice, overflow" => Tensor::from_slice(&ctx, &[1.0f32; 4], &[2, huge, 2]), "Shape", ["tensor"];
        "from_f32 f16, length" => Tensor::from_f32(&ctx, &[1.0; 3], &[4], DType::F16), "Shape", ["tensor"];
    );
    let small = ctx
        .create_buffer("small", 16, wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC)
        .unwrap();
    cases!(cat;
        "from_buffer, shape overflows (was Ok with size_bytes 0)" => Tensor::from_buffer(&ctx, small.clone(), &[3, huge], DType::F32), "Shape", ["tensor", "shape"];
        "from_buffer, too small" => Tensor::from_buffer(&ctx, small.clone(), &[5], DType::F32), "BufferTooSmall", ["tensor", "buffer"];
    );
    let uniform = ctx
        .create_buffer(
            "uniform",
            16,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )
        .unwrap();
    cases!(cat;
        "from_buffer, no STORAGE usage" => Tensor::from_buffer(&ctx, uniform, &[4], DType::F32), "Buffer", ["tensor", "buffer", "STORAGE"];
    );
    let foreign_buffer = other
        .create_buffer(
            "foreign",
            16,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        )
        .unwrap();
    cases!(cat;
        "from_buffer, buffer of another device" => Tensor::from_buffer(&ctx, foreign_buffer, &[4], DType::F32), "WrongDevice", ["tensor", "buffer"];
    );
    let destroyed = ctx
        .create_buffer(
            "destroyed",
            16,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        )
        .unwrap();
    destroyed.destroy();
    cases!(cat;
        "from_buffer, destroyed buffer" => Tensor::from_buffer(&ctx, destroyed, &[4], DType::F32), "Buffer", ["tensor", "buffer"];
    );
    let t = Tensor::zeros(&ctx, &[4], DType::F32).unwrap();
    let foreign = Tensor::zeros(&other, &[4], DType::F32).unwrap();
    cases!(cat;
        "write, dtype" => t.write(&ctx, &[half::f16::ZERO; 4]), "DType", ["tensor write", "data"];
        "write, length" => t.write(&ctx, &[0.0f32; 5]), "Shape", ["tensor write", "data"];
        "write, other context" => foreign.write(&ctx, &[0.0f32; 4]), "WrongDevice", ["tensor write", "tensor"];
        "read, dtype" => t.to_vec_blocking::<half::f16>(&ctx), "DType", ["tensor read", "destination"];
        "read, other context" => foreign.to_vec_blocking::<f32>(&ctx), "WrongDevice", ["tensor read", "tensor"];
        "read f64, other context" => foreign.to_f64_blocking(&ctx), "WrongDevice", ["tensor read"];
    );

    // Configurations: every field out of its domain, through the module constructors.
    let bn = |c: BatchNormConfig| BatchNorm::with_config(&ctx, c);
    let bn_cfg = |f: &dyn Fn(&mut BatchNormConfig)| {
        let mut c = BatchNormConfig::new(4);
        f(&mut c);
        c
    };
    cases!(cat;
        "BatchNorm, 0 features" => bn(BatchNormConfig::new(0)), "InvalidArgument", ["batch_norm", "num_features"];
        "BatchNorm, 2^40 features (aborted on a 4 TB host vector)" => bn(BatchNormConfig::new(1 << 40)), "ExceedsLimit", ["batch_norm", "num_features"];
        "BatchNorm, 2^62 features" => bn(BatchNormConfig::new(huge)), "ExceedsLimit", ["batch_norm"];
    );
    for (name, eps) in [
        ("0", 0.0),
        ("negative", -1e-5),
        ("NaN", f32::NAN),
        ("inf", f32::INFINITY),
    ] {
        cases!(cat;
            format!("BatchNorm, eps {name}") => bn(bn_cfg(&|c| c.eps = eps)), "InvalidArgument", ["batch_norm", "eps"];
        );
    }
    for (name, m) in [
        ("negative", -0.1),
        ("above 1", 1.5),
        ("NaN", f32::NAN),
        ("inf", f32::INFINITY),
    ] {
        cases!(cat;
            format!("BatchNorm, momentum {name}") => bn(bn_cfg(&|c| c.momentum = Some(m))), "InvalidArgument", ["batch_norm", "momentum"];
        );
    }
    let ln = |c: LayerNormConfig| LayerNorm::with_config(&ctx, c);
    cases!(cat;
        "LayerNorm, empty shape" => ln(LayerNormConfig::new(&[])), "InvalidArgument", ["layer_norm", "normalized_shape"];
        "LayerNorm, zero dim" => ln(LayerNormConfig::new(&[4, 0])), "InvalidArgument", ["layer_norm", "normalized_shape"];
        "LayerNorm, [2^20, 2^20] (aborted on a 4 TB host vector)" => LayerNorm::new(&ctx, &[1 << 20, 1 << 20]), "ExceedsLimit", ["layer_norm", "normalized_shape"];
        "LayerNorm, [3, 2^62] (panicked: capacity overflow)" => LayerNorm::new(&ctx, &[3, huge]), "ExceedsLimit", ["layer_norm", "normalized_shape"];
    );
    for (name, eps) in [
        ("0", 0.0),
        ("negative", -1.0),
        ("NaN", f32::NAN),
        ("inf", f32::INFINITY),
    ] {
        let mut c = LayerNormConfig::new(&[8]);
        c.eps = eps;
        cases!(cat;
            format!("LayerNorm, eps {name}") => ln(c), "InvalidArgument", ["layer_norm", "eps"];
        );
    }
    for (name, p) in [
        ("negative", -0.1),
        ("above 1", 1.01),
        ("NaN", f64::NAN),
        ("inf", f64::INFINITY),
    ] {
        cases!(cat;
            format!("Dropout, p {name}") => Dropout::new(&ctx, p), "InvalidArgument", ["dropout", "p"];
            format!("Dropout2d, p {name}") => Dropout2d::new(&ctx, p), "InvalidArgument", ["dropout", "p"];
            format!("BatchNormDropout, p {name}") => BatchNormDropout::new(&ctx, BatchNormConfig::new(4), DropoutConfig::new(p), 0), "InvalidArgument", ["dropout", "p"];
            format!("LayerNormDropout, p {name}") => LayerNormDropout::new(&ctx, LayerNormConfig::new(&[8]), DropoutConfig::new(p), 0), "InvalidArgument", ["dropout", "p"];
        );
    }

    // sgd_step.
    let p = tensor(&ctx, &[8], 1);
    let g = tensor(&ctx, &[8], 2);
    let before = f32s(&ctx, &p);
    let pf = tensor(&other, &[8], 1);
    cases!(cat;
        "sgd, param of another context" => normdrop::sgd_step(&ctx, &pf, &g, 0.1), "WrongDevice", ["sgd", "param"];
        "sgd, grad of another context" => normdrop::sgd_step(&ctx, &p, &tensor(&other, &[8], 2), 0.1), "WrongDevice", ["sgd", "grad"];
        "sgd, grad is param" => normdrop::sgd_step(&ctx, &p, &p, 0.1), "Aliased", ["sgd", "param", "grad"];
        "sgd, shapes" => normdrop::sgd_step(&ctx, &p, &tensor(&ctx, &[4], 3), 0.1), "Shape", ["sgd", "grad"];
        "sgd, f16 grad" => normdrop::sgd_step(&ctx, &p, &Tensor::zeros(&ctx, &[8], DType::F16).unwrap(), 0.1), "DType", ["sgd", "grad"];
        "sgd, NaN learning rate" => normdrop::sgd_step(&ctx, &p, &g, f32::NAN), "InvalidArgument", ["sgd", "learning rate"];
    );
    assert_eq!(f32s(&ctx, &p), before, "a failed sgd_step changed the parameter");
    assert_eq!(
        f32s(&other, &pf),
        before,
        "a failed sgd_step changed the other context's parameter"
    );
    cat.finish(60);
}

/// Runs `ops` on a module prepared by one successful training forward, checking that each
/// failing call leaves the state as it was; then a valid forward and backward on it must equal,
/// bit for bit, the same calls on a module that saw no errors.
#[test]
fn modules() {
    let ctx = gpu!();
    let other = other_ctx();
    let mut cat = Catalogue::new("modules");
    let shape = [4, 3, 5];
    let x = tensor(&ctx, &shape, 10);
    let dy = tensor(&ctx, &shape, 11);
    let foreign = tensor(&other, &shape, 10);
    let c3 = |seed| tensor(&ctx, &[3], seed);

    // BatchNorm.
    let fresh_bn = || {
        let mut bn = BatchNorm::new(&ctx, 3).unwrap();
        bn.forward(&x).unwrap();
        bn
    };
    let mut bn = BatchNorm::new(&ctx, 3).unwrap();
    let snap = |m: &BatchNorm| bn_snapshot(&ctx, m);
    module_cases!(cat, &mut bn, snap;
        "BatchNorm backward before forward" => |m| m.backward(&dy), "State", ["BatchNorm", "forward"];
    );
    bn.forward(&x).unwrap();
    module_cases!(cat, &mut bn, snap;
        "BatchNorm, x of another context (normalized a tensor of A)" => |m| m.forward(&foreign), "WrongDevice", ["BatchNorm", "x"];
        "BatchNorm, rank 1" => |m| m.forward(&c3(1)), "Shape", ["batch_norm", "input"];
        "BatchNorm, channels" => |m| m.forward(&tensor(&ctx, &[4, 5, 2], 1)), "Shape", ["batch_norm", "input"];
        "BatchNorm, empty batch" => |m| m.forward(&Tensor::zeros(&ctx, &[0, 3, 5], DType::F32).unwrap()), "Shape", ["batch_norm", "input"];
        "BatchNorm, one value per channel" => |m| m.forward(&tensor(&ctx, &[1, 3], 1)), "Shape", ["batch_norm", "input"];
        "BatchNorm backward, dy of another context" => |m| m.backward(&tensor(&other, &shape, 1)), "WrongDevice", ["BatchNorm", "dy"];
        "BatchNorm backward, dy shape" => |m| m.backward(&tensor(&ctx, &[4, 3, 4], 1)), "Shape", ["BatchNorm", "dy"];
        "BatchNorm backward, dy dtype" => |m| m.backward(&Tensor::zeros(&ctx, &shape, DType::F16).unwrap()), "DType", ["BatchNorm", "dy"];
    );
    let dx = Tensor::zeros(&ctx, &shape, DType::F32).unwrap();
    let (dw, db) = (c3(20), c3(21));
    let into = |dx: &Tensor, dw: Option<&Tensor>, db: Option<&Tensor>, dy: &Tensor| {
        let (dx, dw, db, dy) = (dx.clone(), dw.cloned(), db.cloned(), dy.clone());
        move |m: &mut BatchNorm| {
            m.backward_into(
                &dy,
                GradTargets {
                    dx: &dx,
                    dweight: dw.as_ref(),
                    dbias: db.as_ref(),
                },
                Accumulate::default(),
            )
        }
    };
    module_cases!(cat, &mut bn, snap;
        "BatchNorm backward_into, dweight is dbias (one was lost)" => into(&dx, Some(&dw), Some(&dw), &dy), "Aliased", ["batch_norm backward", "dweight", "dbias"];
        "BatchNorm backward_into, dx is dy" => into(&dy, Some(&dw), Some(&db), &dy), "Aliased", ["batch_norm backward", "dx", "dy"];
        "BatchNorm backward_into, dx is the saved x" => into(&x, Some(&dw), Some(&db), &dy), "Aliased", ["batch_norm backward", "dx", "x"];
        "BatchNorm backward_into, dweight is dy" => into(&dx, Some(&dy), Some(&db), &dy), "Shape", ["BatchNorm", "dweight"];
        "BatchNorm backward_into, dx of another context" => into(&foreign, Some(&dw), Some(&db), &dy), "WrongDevice", ["BatchNorm", "dx"];
        "BatchNorm backward_into, dbias of another context" => into(&dx, Some(&dw), Some(&tensor(&other, &[3], 1)), &dy), "WrongDevice", ["BatchNorm", "dbias"];
        "BatchNorm backward_into, dweight shape" => into(&dx, Some(&tensor(&ctx, &[4], 1)), Some(&db), &dy), "Shape", ["BatchNorm", "dweight"];
        "BatchNorm backward_into, missing dweight" => into(&dx, None, Some(&db), &dy), "Buffer", ["batch_norm backward", "dweight"];
        "BatchNorm set_weight, length" => |m| m.set_weight(&[1.0; 4]), "Shape", ["BatchNorm", "weight"];
        "BatchNorm set_running_var, length" => |m| m.set_running_var(&[]), "Shape", ["BatchNorm", "running_var"];
    );
    bn.eval();
    module_cases!(cat, &mut bn, snap;
        "BatchNorm backward after a mode change" => |m| m.backward(&dy), "State", ["BatchNorm", "mode"];
    );
    bn.train();
    let a = (bn.forward(&x).unwrap(), bn.backward(&dy).unwrap());
    let mut reference = fresh_bn();
    let b = (reference.forward(&x).unwrap(), reference.backward(&dy).unwrap());
    assert_eq!(f32s(&ctx, &a.0), f32s(&ctx, &b.0), "BatchNorm y after the errors");
    assert_eq!(
        f32s(&ctx, &a.1.dx),
        f32s(&ctx, &b.1.dx),
        "BatchNorm dx after the errors"
    );
    assert_eq!(
        bn_snapshot(&ctx, &bn),
        bn_snapshot(&ctx, &reference),
        "BatchNorm state after the errors"
    );

    // LayerNorm.
    let lshape = [6, 8];
    let lx = tensor(&ctx, &lshape, 30);
    let ldy = tensor(&ctx, &lshape, 31);
    let mut ln = LayerNorm::new(&ctx, &[8]).unwrap();
    let snap = |m: &LayerNorm| ln_snapshot(&ctx, m);
    module_cases!(cat, &mut ln, snap;
        "LayerNorm backward before forward" => |m| m.backward(&ldy), "State", ["LayerNorm", "forward"];
    );
    ln.forward(&lx).unwrap();
    module_cases!(cat, &mut ln, snap;
        "LayerNorm, x of another context" => |m| m.forward(&tensor(&other, &lshape, 1)), "WrongDevice", ["LayerNorm", "x"];
        "LayerNorm, trailing dims" => |m| m.forward(&tensor(&ctx, &[6, 7], 1)), "Shape", ["layer_norm", "input"];
        "LayerNorm, empty rows" => |m| m.forward(&Tensor::zeros(&ctx, &[0, 8], DType::F32).unwrap()), "Shape", ["layer_norm", "input"];
        "LayerNorm backward, dy shape" => |m| m.backward(&tensor(&ctx, &[5, 8], 1)), "Shape", ["LayerNorm backward", "dy"];
        "LayerNorm backward, dy of another context" => |m| m.backward(&tensor(&other, &lshape, 1)), "WrongDevice", ["LayerNorm backward", "dy"];
        "LayerNorm backward, dy dtype" => |m| m.backward(&Tensor::zeros(&ctx, &lshape, DType::F16).unwrap()), "DType", ["LayerNorm backward", "dy"];
    );
    let ldx = Tensor::zeros(&ctx, &lshape, DType::F32).unwrap();
    let (ldw, ldb) = (tensor(&ctx, &[8], 40), tensor(&ctx, &[8], 41));
    let linto = |dx: &Tensor, dw: Option<&Tensor>, db: Option<&Tensor>| {
        let (dx, dw, db, dy) = (dx.clone(), dw.cloned(), db.cloned(), ldy.clone());
        move |m: &mut LayerNorm| {
            m.backward_into(
                &dy,
                GradTargets {
                    dx: &dx,
                    dweight: dw.as_ref(),
                    dbias: db.as_ref(),
                },
                Accumulate::default(),
            )
        }
    };
    module_cases!(cat, &mut ln, snap;
        "LayerNorm backward_into, dweight is dbias" => linto(&ldx, Some(&ldw), Some(&ldw)), "Aliased", ["layer_norm backward", "dweight", "dbias"];
        "LayerNorm backward_into, dx is dy" => linto(&ldy, Some(&ldw), Some(&ldb)), "Aliased", ["layer_norm backward", "dx", "dy"];
        "LayerNorm backward_into, dx is the saved x" => linto(&lx, Some(&ldw), Some(&ldb)), "Aliased", ["layer_norm backward", "dx", "x"];
        "LayerNorm backward_into, dx of another context" => linto(&tensor(&other, &lshape, 1), Some(&ldw), Some(&ldb)), "WrongDevice", ["LayerNorm backward", "dx"];
        "LayerNorm backward_into, dweight of another context" => linto(&ldx, Some(&tensor(&other, &[8], 1)), Some(&ldb)), "WrongDevice", ["LayerNorm backward", "dweight"];
        "LayerNorm backward_into, dbias shape" => linto(&ldx, Some(&ldw), Some(&tensor(&ctx, &[6], 1))), "Shape", ["LayerNorm backward", "dbias"];
        "LayerNorm backward_into, missing dbias" => linto(&ldx, Some(&ldw), None), "Buffer", ["layer_norm backward", "dbias"];
        "LayerNorm set_bias, length" => |m| m.set_bias(&[0.0; 9]), "Shape", ["LayerNorm", "bias"];
    );
    let a = (ln.forward(&lx).unwrap(), ln.backward(&ldy).unwrap());
    let mut reference = LayerNorm::new(&ctx, &[8]).unwrap();
    reference.forward(&lx).unwrap();
    let b = (reference.forward(&lx).unwrap(), reference.backward(&ldy).unwrap());
    assert_eq!(f32s(&ctx, &a.0), f32s(&ctx, &b.0), "LayerNorm y after the errors");
    assert_eq!(
        f32s(&ctx, &a.1.dx),
        f32s(&ctx, &b.1.dx),
        "LayerNorm dx after the errors"
    );
    assert_eq!(
        ln_snapshot(&ctx, &ln),
        ln_snapshot(&ctx, &reference),
        "LayerNorm state after the errors"
    );

    // Dropout and Dropout2d.
    let dshape = [4, 6, 8];
    let dxin = tensor(&ctx, &dshape, 50);
    let ddy = tensor(&ctx, &dshape, 51);
    for unit in [DropoutUnit::Element, DropoutUnit::Channel] {
        let name = match unit {
            DropoutUnit::Element => "Dropout",
            DropoutUnit::Channel => "Dropout2d",
        };
        let make = || match unit {
            DropoutUnit::Element => AnyDropout::One(Dropout::with_config(&ctx, DropoutConfig::new(0.3), 7).unwrap()),
            DropoutUnit::Channel => AnyDropout::Two(Dropout2d::with_config(&ctx, DropoutConfig::new(0.3), 7).unwrap()),
        };
        let mut d = make();
        let snap = |m: &AnyDropout| dropout_snapshot(m);
        module_cases!(cat, &mut d, snap;
            format!("{name} backward before forward") => |m| m.backward(&ddy), "State", ["Dropout backward", "forward"];
        );
        d.forward(&dxin).unwrap();
        module_cases!(cat, &mut d, snap;
            format!("{name}, x of another context") => |m| m.forward(&tensor(&other, &dshape, 1)), "WrongDevice", ["Dropout", "x"];
            format!("{name}, empty") => |m| m.forward(&Tensor::zeros(&ctx, &[4, 0, 8], DType::F32).unwrap()), "Shape", ["dropout", "input"];
            format!("{name} backward, dy shape") => |m| m.backward(&tensor(&ctx, &[4, 6, 7], 1)), "Shape", ["Dropout backward", "dy"];
            format!("{name} backward, dy of another context") => |m| m.backward(&tensor(&other, &dshape, 1)), "WrongDevice", ["Dropout backward", "dy"];
        );
        let dx = Tensor::zeros(&ctx, &dshape, DType::F32).unwrap();
        module_cases!(cat, &mut d, snap;
            format!("{name} backward_into, dx is dy") => |m| m.backward_into(&ddy, &ddy, false), "Aliased", ["dropout", "y", "x"];
            format!("{name} backward_into, dx of another context") => |m| m.backward_into(&ddy, &tensor(&other, &dshape, 1), false), "WrongDevice", ["Dropout backward", "dx"];
            format!("{name} backward_into, dx dtype") => |m| m.backward_into(&ddy, &Tensor::zeros(&ctx, &dshape, DType::F16).unwrap(), false), "DType", ["Dropout backward", "dx"];
        );
        let mut elsewhere = Dropout::new(&other, 0.3).unwrap();
        let (_, foreign_mask) = elsewhere.forward_with_mask(&tensor(&other, &dshape, 1)).unwrap();
        module_cases!(cat, &mut d, snap;
            format!("{name} backward_from_mask, mask of another context") => |m| m.backward_from_mask(&ddy, &foreign_mask), "WrongDevice", ["Dropout backward", "mask"];
        );
        // A forward that fails at submission (a still-mapped input buffer) must not leave its
        // plan and shape behind for backward: this returned a wrong dx with Ok.
        let mapped = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("mapped"),
            size: 4 * 40,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: true,
        });
        let mapped = Tensor::from_buffer(&ctx, mapped, &[5, 8], DType::F32).unwrap();
        module_cases!(cat, &mut d, snap;
            format!("{name}, still-mapped input") => |m| m.forward(&mapped), "Validation", ["mapped"];
        );
        d.backward_into(&ddy, &dx, false).unwrap();
        let mut reference = make();
        reference.forward(&dxin).unwrap();
        let rdx = reference.backward(&ddy).unwrap();
        assert_eq!(f32s(&ctx, &dx), f32s(&ctx, &rdx), "{name} dx after a failed forward");
        let a = d.forward(&dxin).unwrap();
        let b = reference.forward(&dxin).unwrap();
        assert_eq!(f32s(&ctx, &a), f32s(&ctx, &b), "{name} y after the errors");
        assert_eq!(
            dropout_snapshot(&d),
            dropout_snapshot(&reference),
            "{name} state after the errors"
        );
    }

    // Fused modules.
    let mut bnd = BatchNormDropout::new(&ctx, BatchNormConfig::new(3), DropoutConfig::new(0.2), 3).unwrap();
    let snap = |m: &BatchNormDropout| {
        let mut s = bn_snapshot(&ctx, m.batch_norm());
        s.push(generator(m.state(), m.last_call()));
        s
    };
    module_cases!(cat, &mut bnd, snap;
        "BatchNormDropout backward before forward" => |m| m.backward(&dy), "State", ["BatchNorm", "forward"];
    );
    bnd.forward(&x).unwrap();
    module_cases!(cat, &mut bnd, snap;
        "BatchNormDropout, x of another context" => |m| m.forward(&foreign), "WrongDevice", ["BatchNorm", "x"];
        "BatchNormDropout, channels" => |m| m.forward(&tensor(&ctx, &[4, 2, 5], 1)), "Shape", ["batch_norm", "input"];
        "BatchNormDropout, with mask, channels" => |m| m.forward_with_mask(&tensor(&ctx, &[4, 2, 5], 1)), "Shape", ["batch_norm", "input"];
        "BatchNormDropout backward, dy shape" => |m| m.backward(&c3(1)), "Shape", ["BatchNorm", "dy"];
        "BatchNormDropout backward_into, dweight is dbias" => |m| { m.backward_into(&dy, GradTargets { dx: &dx, dweight: Some(&dw), dbias: Some(&dw) }, Accumulate::default()) }, "Aliased", ["batch_norm backward", "dweight", "dbias"];
    );
    let a = (bnd.forward(&x).unwrap(), bnd.backward(&dy).unwrap());
    let mut reference = BatchNormDropout::new(&ctx, BatchNormConfig::new(3), DropoutConfig::new(0.2), 3).unwrap();
    reference.forward(&x).unwrap();
    let b = (reference.forward(&x).unwrap(), reference.backward(&dy).unwrap());
    assert_eq!(
        f32s(&ctx, &a.0),
        f32s(&ctx, &b.0),
        "BatchNormDropout y after the errors"
    );
    assert_eq!(
        f32s(&ctx, &a.1.dx),
        f32s(&ctx, &b.1.dx),
        "BatchNormDropout dx after the errors"
    );
    assert_eq!(snap(&bnd), snap(&reference), "BatchNormDropout state after the errors");
    let mut lnd = LayerNormDropout::new(&ctx, LayerNormConfig::new(&[8]), DropoutConfig::new(0.2), 3).unwrap();
    let snap = |m: &LayerNormDropout| {
        let mut s = ln_snapshot(&ctx, m.layer_norm());
        s.push(generator(m.state(), m.last_call()));
        s
    };
    module_cases!(cat, &mut lnd, snap;
        "LayerNormDropout backward before forward" => |m| m.backward(&ldy), "State", ["fused backward", "forward"];
    );
    lnd.forward(&lx).unwrap();
    module_cases!(cat, &mut lnd, snap;
        "LayerNormDropout, x of another context" => |m| m.forward(&tensor(&other, &lshape, 1)), "WrongDevice", ["LayerNorm", "x"];
        "LayerNormDropout, trailing dims" => |m| m.forward(&tensor(&ctx, &[6, 4], 1)), "Shape", ["layer_norm", "input"];
        "LayerNormDropout backward, dy of another context" => |m| m.backward(&tensor(&other, &lshape, 1)), "WrongDevice", ["LayerNorm backward", "dy"];
    );
    lnd.eval();
    module_cases!(cat, &mut lnd, snap;
        "LayerNormDropout backward after a mode change" => |m| m.backward(&ldy), "State", ["fused backward", "mode"];
    );
    lnd.train();
    let a = (lnd.forward(&lx).unwrap(), lnd.backward(&ldy).unwrap());
    let mut reference = LayerNormDropout::new(&ctx, LayerNormConfig::new(&[8]), DropoutConfig::new(0.2), 3).unwrap();
    reference.forward(&lx).unwrap();
    let b = (reference.forward(&lx).unwrap(), reference.backward(&ldy).unwrap());
    assert_eq!(
        f32s(&ctx, &a.0),
        f32s(&ctx, &b.0),
        "LayerNormDropout y after the errors"
    );
    assert_eq!(
        f32s(&ctx, &a.1.dx),
        f32s(&ctx, &b.1.dx),
        "LayerNormDropout dx after the errors"
    );
    assert_eq!(snap(&lnd), snap(&reference), "LayerNormDropout state after the errors");
    let mut res = ResidualDropoutLayerNorm::new(&ctx, LayerNormConfig::new(&[8]), DropoutConfig::new(0.2), 3).unwrap();
    let snap = |m: &ResidualDropoutLayerNorm| {
        let mut s = ln_snapshot(&ctx, m.layer_norm());
        s.push(generator(m.state(), m.last_call()));
        s
    };
    let r = tensor(&ctx, &lshape, 60);
    res.forward(&lx, &r).unwrap();
    module_cases!(cat, &mut res, snap;
        "Residual block, residual of another context" => |m| m.forward(&lx, &tensor(&other, &lshape, 1)), "WrongDevice", ["LayerNorm", "residual"];
        "Residual block, residual shape" => |m| m.forward(&lx, &tensor(&ctx, &[5, 8], 1)), "Shape", ["LayerNorm", "residual"];
        "Residual block, residual dtype" => |m| m.forward(&lx, &Tensor::zeros(&ctx, &lshape, DType::F16).unwrap()), "DType", ["LayerNorm", "residual"];
        "Residual block backward, dh_in shape" => |m| m.backward(&ldy, Some(&tensor(&ctx, &[6, 4], 1))), "Shape", ["LayerNorm backward", "dh_in"];
        "Residual block backward, dh_in of another context" => |m| m.backward(&ldy, Some(&tensor(&other, &lshape, 1))), "WrongDevice", ["LayerNorm backward", "dh_in"];
    );
    let a = res.forward(&lx, &r).unwrap();
    let ga = res.backward(&ldy, None).unwrap();
    let mut reference =
        ResidualDropoutLayerNorm::new(&ctx, LayerNormConfig::new(&[8]), DropoutConfig::new(0.2), 3).unwrap();
    reference.forward(&lx, &r).unwrap();
    let b = reference.forward(&lx, &r).unwrap();
    let gb = reference.backward(&ldy, None).unwrap();
    assert_eq!(f32s(&ctx, &a.0), f32s(&ctx, &b.0), "residual block y after the errors");
    assert_eq!(f32s(&ctx, &a.1), f32s(&ctx, &b.1), "residual block h after the errors");
    assert_eq!(
        f32s(&ctx, &ga.dx),
        f32s(&ctx, &gb.dx),
        "residual block dx after the errors"
    );
    assert_eq!(
        f32s(&ctx, &ga.dresidual),
        f32s(&ctx, &gb.dresidual),
        "residual block dresidual after the errors"
    );
    assert_eq!(snap(&res), snap(&reference), "residual block state after the errors");

    // GroupNorm (InstanceNorm is the same module with G = C).
    let gshape = [3, 6, 5];
    let gx = tensor(&ctx, &gshape, 60);
    let gdy = tensor(&ctx, &gshape, 61);
    let gn_snapshot = |m: &GroupNorm| {
        let mut s = Snapshot::new();
        push(&mut s, &ctx, "weight", m.weight());
        push(&mut s, &ctx, "bias", m.bias());
        if let Some(saved) = m.saved() {
            push(&mut s, &ctx, "saved.mean", Some(&saved.mean));
            push(&mut s, &ctx, "saved.rstd", Some(&saved.rstd));
            push(&mut s, &ctx, "saved.input", Some(&saved.input));
        }
        s
    };
    let mut gn = GroupNorm::new(&ctx, 2, 6).unwrap();
    module_cases!(cat, &mut gn, gn_snapshot;
        "GroupNorm backward before forward" => |m| m.backward(&gdy), "State", ["GroupNorm", "forward"];
    );
    gn.forward(&gx).unwrap();
    let (gdx, gdw, gdb) = (
        Tensor::zeros(&ctx, &gshape, DType::F32).unwrap(),
        tensor(&ctx, &[6], 62),
        tensor(&ctx, &[6], 63),
    );
    let ginto = |dx: &Tensor, dw: Option<&Tensor>, db: Option<&Tensor>| {
        let (dx, dw, db, dy) = (dx.clone(), dw.cloned(), db.cloned(), gdy.clone());
        move |m: &mut GroupNorm| {
            m.backward_into(
                &dy,
                GradTargets {
                    dx: &dx,
                    dweight: dw.as_ref(),
                    dbias: db.as_ref(),
                },
                Accumulate::default(),
            )
        }
    };
    module_cases!(cat, &mut gn, gn_snapshot;
        "GroupNorm, x of another context" => |m| m.forward(&tensor(&other, &gshape, 1)), "WrongDevice", ["GroupNorm", "x"];
        "GroupNorm, channels" => |m| m.forward(&tensor(&ctx, &[3, 4, 5], 1)), "Shape", ["group_norm", "input"];
        "GroupNorm, rank 1" => |m| m.forward(&tensor(&ctx, &[6], 1)), "Shape", ["group_norm", "input"];
        "GroupNorm, empty batch" => |m| m.forward(&Tensor::zeros(&ctx, &[0, 6, 5], DType::F32).unwrap()), "Shape", ["group_norm", "input"];
        "GroupNorm backward, dy shape" => |m| m.backward(&tensor(&ctx, &[3, 6, 4], 1)), "Shape", ["GroupNorm backward", "dy"];
        "GroupNorm backward, dy of another context" => |m| m.backward(&tensor(&other, &gshape, 1)), "WrongDevice", ["GroupNorm backward", "dy"];
        "GroupNorm backward, dy dtype" => |m| m.backward(&Tensor::zeros(&ctx, &gshape, DType::F16).unwrap()), "DType", ["GroupNorm backward", "dy"];
        "GroupNorm backward_into, dweight is dbias" => ginto(&gdx, Some(&gdw), Some(&gdw)), "Aliased", ["group_norm backward", "dweight", "dbias"];
        "GroupNorm backward_into, dx is dy" => ginto(&gdy, Some(&gdw), Some(&gdb)), "Aliased", ["group_norm backward", "dx", "dy"];
        "GroupNorm backward_into, dx is the saved x" => ginto(&gx, Some(&gdw), Some(&gdb)), "Aliased", ["group_norm backward", "dx", "x"];
        "GroupNorm backward_into, dx of another context" => ginto(&tensor(&other, &gshape, 1), Some(&gdw), Some(&gdb)), "WrongDevice", ["GroupNorm backward", "dx"];
        "GroupNorm backward_into, dbias shape" => ginto(&gdx, Some(&gdw), Some(&tensor(&ctx, &[5], 1))), "Shape", ["GroupNorm backward", "dbias"];
        "GroupNorm backward_into, missing dbias" => ginto(&gdx, Some(&gdw), None), "InvalidArgument", ["GroupNorm backward", "dbias"];
        "GroupNorm set_weight, length" => |m| m.set_weight(&[1.0; 5]), "Shape", ["GroupNorm", "weight"];
    );
    cases!(cat;
        "GroupNorm, C % G != 0" => GroupNorm::new(&ctx, 4, 6), "InvalidArgument", ["group_norm", "divisible"];
        "GroupNorm, no groups" => GroupNorm::new(&ctx, 0, 6), "InvalidArgument", ["group_norm", "num_groups"];
        "GroupNorm, eps NaN" => GroupNorm::with_config(&ctx, GroupNormConfig { eps: f32::NAN, ..GroupNormConfig::new(2, 6) }), "InvalidArgument", ["group_norm", "eps"];
        "InstanceNorm, set_weight without affine" => InstanceNorm::new(&ctx, 6).unwrap().set_weight(&[1.0; 6]), "State", ["GroupNorm", "weight"];
    );
    let a = (gn.forward(&gx).unwrap(), gn.backward(&gdy).unwrap());
    let mut reference = GroupNorm::new(&ctx, 2, 6).unwrap();
    let b = (reference.forward(&gx).unwrap(), reference.backward(&gdy).unwrap());
    assert_eq!(f32s(&ctx, &a.0), f32s(&ctx, &b.0), "GroupNorm y after the errors");
    assert_eq!(
        f32s(&ctx, &a.1.dx),
        f32s(&ctx, &b.1.dx),
        "GroupNorm dx after the errors"
    );
    assert_eq!(
        gn_snapshot(&gn),
        gn_snapshot(&reference),
        "GroupNorm state after the errors"
    );

    // RMSNorm.
    let rms_snapshot = |m: &RmsNorm| {
        let mut s = Snapshot::new();
        push(&mut s, &ctx, "weight", m.weight());
        if let Some(saved) = m.saved() {
            push(&mut s, &ctx, "saved.rstd", Some(&saved.rstd));
            push(&mut s, &ctx, "saved.input", Some(&saved.input));
        }
        s
    };
    let mut rms = RmsNorm::new(&ctx, &[8]).unwrap();
    module_cases!(cat, &mut rms, rms_snapshot;
        "RMSNorm backward before forward" => |m| m.backward(&ldy), "State", ["RMSNorm", "forward"];
    );
    rms.forward(&lx).unwrap();
    module_cases!(cat, &mut rms, rms_snapshot;
        "RMSNorm, x of another context" => |m| m.forward(&tensor(&other, &lshape, 1)), "WrongDevice", ["RMSNorm", "x"];
        "RMSNorm, trailing dims" => |m| m.forward(&tensor(&ctx, &[6, 7], 1)), "Shape", ["rms_norm", "input"];
        "RMSNorm backward, dy shape" => |m| m.backward(&tensor(&ctx, &[5, 8], 1)), "Shape", ["RMSNorm backward", "dy"];
        "RMSNorm backward, dy of another context" => |m| m.backward(&tensor(&other, &lshape, 1)), "WrongDevice", ["RMSNorm backward", "dy"];
        "RMSNorm set_weight, length" => |m| m.set_weight(&[1.0; 9]), "Shape", ["RMSNorm", "weight"];
    );
    let a = (rms.forward(&lx).unwrap(), rms.backward(&ldy).unwrap());
    let mut reference = RmsNorm::new(&ctx, &[8]).unwrap();
    let b = (reference.forward(&lx).unwrap(), reference.backward(&ldy).unwrap());
    assert_eq!(f32s(&ctx, &a.0), f32s(&ctx, &b.0), "RMSNorm y after the errors");
    assert_eq!(f32s(&ctx, &a.1.dx), f32s(&ctx, &b.1.dx), "RMSNorm dx after the errors");
    assert_eq!(
        rms_snapshot(&rms),
        rms_snapshot(&reference),
        "RMSNorm state after the errors"
    );
    cat.finish(90);
}

/// One buffer argument of a low-level call: name, bytes the call needs, whether it writes.
struct Spec {
    name: &'static str,
    bytes: u64,
    written: bool,
}

const fn read(name: &'static str, bytes: u64) -> Spec {
    Spec {
        name,
        bytes,
        written: false,
    }
}

const fn write(name: &'static str, bytes: u64) -> Spec {
    Spec {
        name,
        bytes,
        written: true,
    }
}

type Encode<'e> = dyn Fn(&wgpu::Device, &mut wgpu::CommandEncoder, &[wgpu::BufferSlice<'_>]) -> Result<(), Error> + 'e;

/// The catalogue of one low-level call with arguments `specs` (in the order `encode` takes
/// them): a valid call succeeds; then another device, each argument from another device, every
/// pair of arguments that share bytes where one is written, and each argument too small,
/// misaligned or without `STORAGE` usage, each an error naming `op` and the argument(s).
fn low_level(
    cat: &mut Catalogue,
    ctx: &Context,
    other: &Context,
    label: &str,
    op: &str,
    specs: &[Spec],
    encode: &Encode<'_>,
) {
    let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment);
    let size = specs.iter().map(|s| s.bytes).max().unwrap().div_ceil(4) * 4 + align;
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let make = |c: &Context, usage| -> Vec<wgpu::Buffer> {
        specs
            .iter()
            .map(|_| c.create_buffer("arg", size, usage).unwrap())
            .collect()
    };
    let mine = make(ctx, usage);
    let theirs = make(other, usage);
    let unbindable = make(ctx, wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST);
    fn pick<'b>(n: usize, f: &dyn Fn(usize) -> wgpu::BufferSlice<'b>) -> Vec<wgpu::BufferSlice<'b>> {
        (0..n).map(f).collect()
    }
    let n_args = specs.len();
    let whole = |i: usize| mine[i].slice(..);
    let run = |device: &wgpu::Device, args: &[wgpu::BufferSlice<'_>]| {
        let mut encoder = device.create_command_encoder(&Default::default());
        encode(device, &mut encoder, args)
    };
    run(ctx.device(), &pick(n_args, &whole)).unwrap_or_else(|e| panic!("{label}: the valid call failed: {e}"));
    cases!(cat;
        format!("{label}: another device") => run(other.device(), &pick(n_args, &whole)), "WrongDevice", [op, "device"];
    );
    for (i, spec) in specs.iter().enumerate() {
        let n = spec.name;
        let foreign = pick(n_args, &|j| if j == i { theirs[j].slice(..) } else { whole(j) });
        cases!(cat;
            format!("{label}: `{n}` of another device") => run(ctx.device(), &foreign), "WrongDevice", [op, n];
        );
        let needed = spec.bytes.div_ceil(4) * 4;
        let short = pick(n_args, &|j| if j == i { mine[j].slice(..needed - 4) } else { whole(j) });
        cases!(cat;
            format!("{label}: `{n}` too small") => run(ctx.device(), &short), "BufferTooSmall", [op, n];
        );
        if align > 4 {
            let misaligned = pick(n_args, &|j| if j == i { mine[j].slice(4..) } else { whole(j) });
            cases!(cat;
                format!("{label}: `{n}` misaligned") => run(ctx.device(), &misaligned), "Buffer", [op, n, "offset"];
            );
        }
        let no_storage = pick(n_args, &|j| if j == i { unbindable[j].slice(..) } else { whole(j) });
        cases!(cat;
            format!("{label}: `{n}` without STORAGE") => run(ctx.device(), &no_storage), "Buffer", [op, n, "STORAGE"];
        );
        for (k, o) in specs.iter().enumerate().skip(i + 1) {
            if !(spec.written || o.written) {
                continue;
            }
            let shared = pick(n_args, &|j| if j == k { whole(i) } else { whole(j) });
            cases!(cat;
                format!("{label}: `{}` shares bytes with `{}`", o.name, n) => run(ctx.device(), &shared), "Aliased", [op, n, o.name];
            );
        }
    }
    // Two written arguments in disjoint ranges of one buffer are fine.
    if let Some((i, k)) = (0..specs.len())
        .flat_map(|i| (i + 1..specs.len()).map(move |k| (i, k)))
        .find(|&(i, k)| specs[i].written && specs[k].written)
    {
        let (bi, bk) = (
            specs[i].bytes.div_ceil(align) * align,
            specs[k].bytes.div_ceil(align) * align,
        );
        let pool = ctx.create_buffer("pool", bi + bk, usage).unwrap();
        let disjoint = pick(n_args, &|j| match j {
            j if j == i => pool.slice(..bi),
            j if j == k => pool.slice(bi..),
            j => whole(j),
        });
        run(ctx.device(), &disjoint)
            .unwrap_or_else(|e| panic!("{label}: disjoint outputs in one buffer were refused: {e}"));
    }
}

#[test]
fn low_level_kernels() {
    let ctx = gpu!();
    let other = other_ctx();
    let mut cat = Catalogue::new("low-level kernels");
    let (n, c, s) = (4usize, 3usize, 8usize);
    let x_bytes = (n * c * s * 4) as u64;
    let c_bytes = (c * 4) as u64;
    let shape = [n, c, s];

    // Plans built for one device, asked of another.
    let bn_kernel = ctx.kernel::<BatchNormKernel>().unwrap();
    let config = BatchNormConfig::new(c);
    cases!(cat;
        "BatchNorm plan, another device" => bn_kernel.plan(other.device(), &shape, &config), "WrongDevice", ["batch_norm", "device"];
    );
    let bnb_kernel = ctx.kernel::<BatchNormBackwardKernel>().unwrap();
    cases!(cat;
        "BatchNorm backward plan, another device" => bnb_kernel.plan(other.device(), &shape, &config, None), "WrongDevice", ["batch_norm backward", "device"];
    );
    let ln_kernel = ctx.kernel::<LayerNormKernel>().unwrap();
    let ln_config = LayerNormConfig::new(&[s]);
    cases!(cat;
        "LayerNorm plan, another device" => ln_kernel.plan(other.device(), &shape, &ln_config, LayerNormFusion::None), "WrongDevice", ["layer_norm", "device"];
    );
    let lnb_kernel = ctx.kernel::<LayerNormBackwardKernel>().unwrap();
    cases!(cat;
        "LayerNorm backward plan, another device" => lnb_kernel.plan(other.device(), &shape, &ln_config, LayerNormFusion::None, true), "WrongDevice", ["layer_norm backward", "device"];
    );
    let d_kernel = ctx.kernel::<DropoutKernel>().unwrap();
    cases!(cat;
        "Dropout plan, another device" => d_kernel.plan(other.device(), &shape, &DropoutConfig::new(0.5), DropoutUnit::Element), "WrongDevice", ["dropout", "device"];
    );
    let sgd_kernel = ctx.kernel::<SgdKernel>().unwrap();
    cases!(cat;
        "SGD plan, another device" => sgd_kernel.plan(other.device(), 8, 0.1), "WrongDevice", ["sgd", "device"];
    );
    let rng = other
        .create_buffer("rng", RNG_STATE_BYTES, wgpu::BufferUsages::STORAGE)
        .unwrap();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    cases!(cat;
        "Dropout advance, rng of another device" => d_kernel.encode_advance(ctx.device(), &mut encoder, &rng.slice(..)), "WrongDevice", ["dropout", "rng"];
        "Dropout advance, another device" => d_kernel.encode_advance(other.device(), &mut encoder, &rng.slice(..)), "WrongDevice", ["dropout", "device"];
    );

    // BatchNorm forward, training with running statistics and a fused dropout.
    let options = normdrop::tuning::BatchNormPlanOptions {
        dropout: Some(DropoutConfig::new(0.25)),
        ..Default::default()
    };
    let plan = bn_kernel.plan_with(ctx.device(), &shape, &config, &options).unwrap();
    let specs = [
        read("x", x_bytes),
        write("y", x_bytes),
        read("weight", c_bytes),
        read("bias", c_bytes),
        write("running_mean", c_bytes),
        write("running_var", c_bytes),
        write("num_batches_tracked", 8),
        write("save_mean", c_bytes),
        write("save_invstd", c_bytes),
        read("rng", RNG_STATE_BYTES),
    ];
    low_level(
        &mut cat,
        &ctx,
        &other,
        "BatchNorm forward",
        "batch_norm",
        &specs,
        &|device, encoder, a| {
            let b = BatchNormBuffers {
                x: a[0],
                y: a[1],
                weight: Some(a[2]),
                bias: Some(a[3]),
                running_mean: Some(a[4]),
                running_var: Some(a[5]),
                num_batches_tracked: Some(a[6]),
                save_mean: a[7],
                save_invstd: a[8],
                rng: Some(a[9]),
            };
            plan.encode(device, encoder, true, &b)
        },
    );

    // BatchNorm backward with a fused dropout.
    let plan = bnb_kernel
        .plan(ctx.device(), &shape, &config, Some((DropoutConfig::new(0.25), true)))
        .unwrap();
    let specs = [
        read("x", x_bytes),
        read("dy", x_bytes),
        write("dx", x_bytes),
        read("weight", c_bytes),
        read("save_mean", c_bytes),
        read("save_invstd", c_bytes),
        write("dweight", c_bytes),
        write("dbias", c_bytes),
        read("rng", RNG_STATE_BYTES),
    ];
    low_level(
        &mut cat,
        &ctx,
        &other,
        "BatchNorm backward",
        "batch_norm backward",
        &specs,
        &|device, encoder, a| {
            let b = BatchNormBackwardBuffers {
                x: a[0],
                dy: a[1],
                dx: a[2],
                weight: Some(a[3]),
                save_mean: a[4],
                save_invstd: a[5],
                dweight: Some(a[6]),
                dbias: Some(a[7]),
                rng: Some(a[8]),
            };
            plan.encode(device, encoder, true, Accumulate::default(), &b)
        },
    );

    // The residual LayerNorm block, forward and backward (every LayerNorm buffer at once).
    let rows_bytes = ((n * c) * 4) as u64;
    let w_bytes = (s * 4) as u64;
    let fusion = LayerNormFusion::ResidualDropout(DropoutConfig::new(0.25));
    let plan = ln_kernel.plan(ctx.device(), &shape, &ln_config, fusion).unwrap();
    let specs = [
        read("x", x_bytes),
        write("y", x_bytes),
        read("weight", w_bytes),
        read("bias", w_bytes),
        write("mean", rows_bytes),
        write("rstd", rows_bytes),
        read("rng", RNG_STATE_BYTES),
        read("residual", x_bytes),
        write("h", x_bytes),
    ];
    low_level(
        &mut cat,
        &ctx,
        &other,
        "LayerNorm residual forward",
        "layer_norm",
        &specs,
        &|device, encoder, a| {
            let b = LayerNormBuffers {
                x: a[0],
                y: a[1],
                weight: Some(a[2]),
                bias: Some(a[3]),
                mean: a[4],
                rstd: a[5],
                rng: Some(a[6]),
                residual: Some(a[7]),
                h: Some(a[8]),
            };
            plan.encode(device, encoder, true, &b)
        },
    );
    let plan = lnb_kernel.plan(ctx.device(), &shape, &ln_config, fusion, true).unwrap();
    let specs = [
        read("x", x_bytes),
        read("dy", x_bytes),
        write("dx", x_bytes),
        read("weight", w_bytes),
        read("rstd", rows_bytes),
        write("dweight", w_bytes),
        write("dbias", w_bytes),
        read("rng", RNG_STATE_BYTES),
        read("dh_in", x_bytes),
        write("dresidual", x_bytes),
    ];
    low_level(
        &mut cat,
        &ctx,
        &other,
        "LayerNorm residual backward",
        "layer_norm backward",
        &specs,
        &|device, encoder, a| {
            let b = LayerNormBackwardBuffers {
                x: a[0],
                dy: a[1],
                dx: a[2],
                weight: Some(a[3]),
                rstd: a[4],
                dweight: Some(a[5]),
                dbias: Some(a[6]),
                rng: Some(a[7]),
                dh_in: Some(a[8]),
                dresidual: Some(a[9]),
            };
            plan.encode(device, encoder, Accumulate::default(), &b)
        },
    );

    // Dropout: forward, mask, backward from the mask.
    let plan = d_kernel
        .plan(ctx.device(), &shape, &DropoutConfig::new(0.5), DropoutUnit::Element)
        .unwrap();
    let mask_bytes = plan.mask_words() * 4;
    let specs = [read("x", x_bytes), write("y", x_bytes), write("rng", RNG_STATE_BYTES)];
    low_level(
        &mut cat,
        &ctx,
        &other,
        "Dropout",
        "dropout",
        &specs,
        &|device, encoder, a| {
            let b = DropoutBuffers {
                x: a[0],
                y: a[1],
                rng: a[2],
            };
            plan.encode(device, encoder, true, &b)
        },
    );
    let specs = [write("rng", RNG_STATE_BYTES), write("mask", mask_bytes)];
    low_level(
        &mut cat,
        &ctx,
        &other,
        "Dropout mask",
        "dropout",
        &specs,
        &|device, encoder, a| plan.encode_mask(device, encoder, true, &a[0], &a[1]),
    );
    let specs = [read("dy", x_bytes), write("dx", x_bytes), write("mask", mask_bytes)];
    low_level(
        &mut cat,
        &ctx,
        &other,
        "Dropout from mask",
        "dropout",
        &specs,
        &|device, encoder, a| plan.encode_backward_from_mask(device, encoder, true, false, &a[0], &a[1], &a[2]),
    );

    // SGD.
    let plan = sgd_kernel.plan(ctx.device(), 16, 0.1).unwrap();
    let specs = [write("param", 64), read("grad", 64)];
    low_level(&mut cat, &ctx, &other, "SGD", "sgd", &specs, &|device, encoder, a| {
        plan.encode(device, encoder, &a[0], &a[1])
    });
    cat.finish(250);
}

#[test]
fn state_files() {
    let ctx = gpu!();
    let mut cat = Catalogue::new("state files");
    let x = tensor(&ctx, &[4, 3, 5], 70);
    let mut bn = BatchNorm::new(&ctx, 3).unwrap();
    bn.forward(&x).unwrap();
    let good = bn.state_to_safetensors("").unwrap();
    let snap = |m: &BatchNorm| bn_snapshot(&ctx, m);
    let other_shape = BatchNorm::new(&ctx, 4).unwrap().state_to_safetensors("").unwrap();
    let no_tracking = {
        let mut c = BatchNormConfig::new(3);
        c.track_running_stats = false;
        BatchNorm::with_config(&ctx, c)
            .unwrap()
            .state_to_safetensors("")
            .unwrap()
    };
    let ln_state = LayerNorm::new(&ctx, &[3]).unwrap().state_to_safetensors("").unwrap();
    let mut flipped = good.clone();
    flipped[10] ^= 0xff;
    let mut huge_header = good.clone();
    huge_header[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty file", vec![]),
        ("truncated header length", good[..5].to_vec()),
        ("truncated header", good[..20].to_vec()),
        ("truncated data", good[..good.len() - 3].to_vec()),
        ("flipped header byte", flipped),
        ("header length near 2^63", huge_header),
        ("text", b"not a safetensors file at all".to_vec()),
    ];
    for (name, bytes) in &cases {
        module_cases!(cat, &mut bn, snap;
            format!("BatchNorm state: {name}") => |m| m.load_state_from_safetensors(bytes, ""), "SafeTensors", ["safetensors"];
        );
    }
    module_cases!(cat, &mut bn, snap;
        "BatchNorm state: 4 channels into 3" => |m| m.load_state_from_safetensors(&other_shape, ""), "SafeTensors", ["weight", "shape"];
        "BatchNorm state: no running statistics" => |m| m.load_state_from_safetensors(&no_tracking, ""), "SafeTensors", ["running_mean", "missing"];
        "BatchNorm state: a LayerNorm's" => |m| m.load_state_from_safetensors(&ln_state, ""), "SafeTensors", ["running_mean", "missing"];
        "BatchNorm state: wrong prefix" => |m| m.load_state_from_safetensors(&good, "bn1."), "SafeTensors", ["bn1.weight", "missing"];
    );
    let wrong_dtype = normdrop::state::serialize(&[(
        "weight".to_string(),
        normdrop::StateTensor::I64 {
            shape: vec![3],
            data: vec![1, 1, 1],
        },
    )]);
    if let Ok(bytes) = wrong_dtype {
        module_cases!(cat, &mut bn, snap;
            "BatchNorm state: int64 weight" => |m| m.load_state_from_safetensors(&bytes, ""), "SafeTensors", ["weight", "int64"];
        );
    }
    let missing = std::env::temp_dir().join("normdrop-no-such-state.safetensors");
    module_cases!(cat, &mut bn, snap;
        "BatchNorm state: missing file" => |m| m.load_state(&missing), "Io", ["normdrop-no-such-state"];
    );
    let mut ln = LayerNorm::new(&ctx, &[3]).unwrap();
    let snap = |m: &LayerNorm| ln_snapshot(&ctx, m);
    for (name, bytes) in &cases {
        module_cases!(cat, &mut ln, snap;
            format!("LayerNorm state: {name}") => |m| m.load_state_from_safetensors(bytes, ""), "SafeTensors", ["safetensors"];
        );
    }
    module_cases!(cat, &mut ln, snap;
        "LayerNorm state: a BatchNorm's of another width" => |m| m.load_state_from_safetensors(&other_shape, ""), "SafeTensors", ["weight", "shape"];
    );
    cat.finish(21);
}
