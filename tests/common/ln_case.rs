//! One LayerNorm case checked end to end (forward, backward writing then accumulating, every
//! fusion) against the f64 reference at a chosen `lanes`: shared by the LayerNorm and the
//! binding-range tests (`#[path]`-included, so only the binaries that use it compile it).

use crate::common::{assert_close, Rng};
use normdrop::reference::{layer_norm_backward, layer_norm_forward, widen};
use normdrop::tuning::LayerNormPlanOptions;
use normdrop::{
    Accumulate, Context, DType, LayerNormBackwardBuffers, LayerNormBackwardKernel, LayerNormBuffers, LayerNormConfig,
    LayerNormFusion, LayerNormKernel, Tensor,
};

const RTOL: f64 = 1e-4;
const ATOL: f64 = 1e-5;

fn read(ctx: &Context, t: &Tensor) -> Vec<f32> {
    t.to_vec_blocking(ctx).unwrap()
}

/// Inputs of one shape for a full LayerNorm check at a chosen geometry.
pub struct LanesCase {
    rows: usize,
    width: usize,
    x: Vec<f32>,
    residual: Vec<f32>,
    dy: Vec<f32>,
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// γ and β (`elementwise_affine`, the default); without them no parameter buffers are
    /// bound and no parameter gradients exist.
    affine: bool,
}

impl LanesCase {
    const SEED: u64 = 0x5eed_0123_4567;
    const OFFSET: u64 = 3;

    pub fn new(rng: &mut Rng, rows: usize, width: usize) -> Self {
        Self {
            rows,
            width,
            x: rng.normal_vec(rows * width, 3.0, 2.0),
            residual: rng.normal_vec(rows * width, -1.0, 1.0),
            dy: rng.normal_vec(rows * width, 0.0, 1.0),
            weight: rng.normal_vec(width, 1.0, 0.5),
            bias: rng.normal_vec(width, 0.0, 0.5),
            affine: true,
        }
    }

    /// The same case without γ and β (`elementwise_affine: false`).
    #[allow(dead_code)] // the binding-range tests include this file and use affine cases only
    pub fn without_affine(self) -> Self {
        Self { affine: false, ..self }
    }

    /// Runs the forward and the backward (writing, then accumulating) with `lanes` and
    /// compares every output with the reference (the mask from the CPU twin of the generator).
    /// Returns the backward plan's dispatch chunks.
    pub fn check(&self, ctx: &Context, lanes: u32, fusion: LayerNormFusion) -> usize {
        let options = LayerNormPlanOptions {
            lanes: Some(lanes),
            ..Default::default()
        };
        self.check_with(ctx, &options, fusion)
    }

    /// [`Self::check`] with every geometry option given.
    pub fn check_with(&self, ctx: &Context, options: &LayerNormPlanOptions, fusion: LayerNormFusion) -> usize {
        let (rows, width) = (self.rows, self.width);
        let (shape, n) = ([rows, width], rows * width);
        let config = LayerNormConfig {
            elementwise_affine: self.affine,
            bias: self.affine,
            ..LayerNormConfig::new(&[width])
        };
        let what = format!("{rows}x{width}, {options:?}, {fusion:?}, affine {}", self.affine);
        let device = ctx.device();
        let fplan = ctx
            .kernel::<LayerNormKernel>()
            .unwrap()
            .plan_with(device, &shape, &config, fusion, options)
            .unwrap();
        let bplan = ctx
            .kernel::<LayerNormBackwardKernel>()
            .unwrap()
            .plan_with(device, &shape, &config, fusion, true, options)
            .unwrap();

        // Reference: m = 2 or 0 per element; LN input h = x, or residual + x·m (in f32).
        let rule = normdrop::rng::DropRule::new(0.5).unwrap();
        let keep = normdrop::rng::mask(Self::SEED, Self::OFFSET, n, rule);
        let m: Vec<f32> = match fusion {
            LayerNormFusion::None => vec![1.0; n],
            _ => keep.iter().map(|&k| if k { 2.0 } else { 0.0 }).collect(),
        };
        let residual = matches!(fusion, LayerNormFusion::ResidualDropout(_));
        let h: Vec<f32> = if residual {
            (0..n).map(|i| self.residual[i] + self.x[i] * m[i]).collect()
        } else {
            self.x.clone()
        };
        let r = layer_norm_forward(&widen(&h), &shape, &config, Some(&self.weight), Some(&self.bias)).unwrap();
        // LayerNorm → dropout: y = LN(x)·m and LN's upstream gradient is dy·m.
        let (y_ref, dy_ln): (Vec<f64>, Vec<f64>) = match fusion {
            LayerNormFusion::Dropout(_) => (
                r.y.iter().zip(&m).map(|(y, &m)| y * f64::from(m)).collect(),
                self.dy.iter().zip(&m).map(|(&g, &m)| f64::from(g * m)).collect(),
            ),
            _ => (r.y.clone(), widen(&self.dy)),
        };
        let w64 = widen(&self.weight);
        let rb = layer_norm_backward(&widen(&h), &dy_ln, &shape, &config, Some(&w64), &r.mean, &r.rstd).unwrap();

        let up = |v: &[f32], s: &[usize]| Tensor::from_slice(ctx, v, s).unwrap();
        let zeros = |s: &[usize]| Tensor::zeros(ctx, s, DType::F32).unwrap();
        let (xt, rt, dyt) = (up(&self.x, &shape), up(&self.residual, &shape), up(&self.dy, &shape));
        let (wt, bt) = (up(&self.weight, &[width]), up(&self.bias, &[width]));
        let state = [Self::SEED as u32, (Self::SEED >> 32) as u32, Self::OFFSET as u32, 0];
        let rng = up(&state.map(f32::from_bits), &[4]);
        let (y, ht, mean, rstd) = (zeros(&shape), zeros(&shape), zeros(&[rows]), zeros(&[rows]));
        let (dx, dres, dw, db) = (zeros(&shape), zeros(&shape), zeros(&[width]), zeros(&[width]));
        let dropout = fusion != LayerNormFusion::None;
        let mut encoder = device.create_command_encoder(&Default::default());
        let buffers = LayerNormBuffers {
            x: xt.slice(),
            y: y.slice(),
            weight: self.affine.then(|| wt.slice()),
            bias: self.affine.then(|| bt.slice()),
            mean: mean.slice(),
            rstd: rstd.slice(),
            rng: dropout.then(|| rng.slice()),
            residual: residual.then(|| rt.slice()),
            h: residual.then(|| ht.slice()),
        };
        fplan.encode(device, &mut encoder, true, &buffers).unwrap();
        let backward = LayerNormBackwardBuffers {
            x: if residual { ht.slice() } else { xt.slice() },
            dy: dyt.slice(),
            dx: dx.slice(),
            weight: self.affine.then(|| wt.slice()),
            rstd: rstd.slice(),
            dweight: self.affine.then(|| dw.slice()),
            dbias: self.affine.then(|| db.slice()),
            rng: dropout.then(|| rng.slice()),
            dh_in: None,
            dresidual: residual.then(|| dres.slice()),
        };
        // The backward twice: writing the gradients, then adding to them (the write and the
        // accumulate entry points), so every gradient below is twice the reference's.
        bplan
            .encode(device, &mut encoder, Accumulate::default(), &backward)
            .unwrap();
        let both = Accumulate { dx: true, params: true };
        bplan.encode(device, &mut encoder, both, &backward).unwrap();
        ctx.queue().submit([encoder.finish()]);

        let close = |name: &str, got: &Tensor, exp: &[f64], atol: f64| {
            assert_close(&format!("{what} {name}"), &read(ctx, got), exp, RTOL, atol);
        };
        let twice = |v: &[f64]| v.iter().map(|g| 2.0 * g).collect::<Vec<_>>();
        close("y", &y, &y_ref, ATOL);
        close("mean", &mean, &r.mean, ATOL);
        close("rstd", &rstd, &r.rstd, ATOL);
        if self.affine {
            close("2·dγ", &dw, &twice(&rb.dweight), 2e-4);
            close("2·dβ", &db, &twice(&rb.dbias), 2e-4);
        }
        if residual {
            close("h", &ht, &widen(&h), ATOL);
            close("2·dresidual", &dres, &twice(&rb.dx), 2.0 * ATOL);
            let dx_ref: Vec<f64> = rb.dx.iter().zip(&m).map(|(d, &m)| 2.0 * d * f64::from(m)).collect();
            close("2·dx", &dx, &dx_ref, 2.0 * ATOL);
        } else {
            close("2·dx", &dx, &twice(&rb.dx), 2.0 * ATOL);
        }
        bplan.ranges()
    }
}
