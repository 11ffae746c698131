//! The f64 CPU references of RMSNorm and GroupNorm (issue 25's tested contract, ahead of their
//! GPU kernels): against the PyTorch fixtures (`rms_*`, `gn_*`; every expected tensor,
//! gradients included), and their backward formulas against central finite differences of the
//! forward. CPU only.

use std::path::Path;

use normdrop::reference::{group_norm_backward, group_norm_forward, rms_norm_backward, rms_norm_forward, RefGrads};
use normdrop::{GroupNormConfig, RmsNormConfig};
use normdrop_cli::fixture::{compare, Fixture};

/// The fixtures whose names start with `prefix`, from `tests/fixtures/torch`.
fn fixtures(prefix: &str) -> Vec<Fixture> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut paths: Vec<_> = ["torch"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    paths.sort();
    paths.iter().map(|p| Fixture::load(p).unwrap()).collect()
}

/// Compares every expected tensor of `fx` in `got` (name → values); every expected tensor
/// must be computed.
fn assert_matches(fx: &Fixture, got: &[(&str, &[f64])]) {
    let names = fx.expected_names();
    assert!(!names.is_empty(), "{}: nothing expected", fx.name);
    for name in names {
        let (_, values) = got
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{}: the reference does not compute `{name}`", fx.name));
        let exp = &fx.tensor(&name).unwrap().data;
        let c = compare(values, exp, fx.rtol, fx.atol);
        assert!(
            c.passed,
            "{} {name}: max_abs_err {:.3e}, {:.2}x the tolerance",
            fx.name, c.max_abs_err, c.worst_ratio
        );
    }
}

fn config_usizes(v: &serde_json::Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn rms_norm_reference_matches_every_fixture() {
    let cases = fixtures("rms_");
    assert_eq!(cases.len(), 7);
    for fx in &cases {
        assert_eq!(fx.op, "rms_norm");
        let cfg = &fx.config;
        let config = RmsNormConfig {
            normalized_shape: config_usizes(&cfg["normalized_shape"]),
            eps: cfg["eps"].as_f64().map(|e| e as f32),
            elementwise_affine: cfg["elementwise_affine"].as_bool().unwrap(),
        };
        let x = fx.tensor("x").unwrap();
        let dy = &fx.tensor("dy").unwrap().data;
        let weight = config
            .elementwise_affine
            .then(|| fx.tensor("weight").unwrap().data.clone());
        let f = rms_norm_forward(&x.data, &x.shape, &config, weight.as_deref()).unwrap();
        let g = rms_norm_backward(&x.data, dy, &x.shape, &config, weight.as_deref(), &f.rstd).unwrap();
        assert_matches(
            fx,
            &[("y", &f.y), ("rstd", &f.rstd), ("dx", &g.dx), ("dweight", &g.dweight)],
        );
    }
}

#[test]
fn group_norm_reference_matches_every_fixture() {
    let cases = fixtures("gn_");
    assert_eq!(cases.len(), 7);
    for fx in &cases {
        assert_eq!(fx.op, "group_norm");
        let cfg = &fx.config;
        let config = GroupNormConfig {
            num_groups: cfg["num_groups"].as_u64().unwrap() as usize,
            num_channels: cfg["num_channels"].as_u64().unwrap() as usize,
            eps: cfg["eps"].as_f64().unwrap() as f32,
            affine: cfg["affine"].as_bool().unwrap(),
        };
        let x = fx.tensor("x").unwrap();
        let dy = &fx.tensor("dy").unwrap().data;
        let param = |n: &str| config.affine.then(|| fx.tensor(n).unwrap().data.clone());
        let (weight, bias) = (param("weight"), param("bias"));
        let f = group_norm_forward(&x.data, &x.shape, &config, weight.as_deref(), bias.as_deref()).unwrap();
        let g = group_norm_backward(&x.data, dy, &x.shape, &config, weight.as_deref(), &f.mean, &f.rstd).unwrap();
        assert_matches(
            fx,
            &[
                ("y", &f.y),
                ("mean", &f.mean),
                ("rstd", &f.rstd),
                ("dx", &g.dx),
                ("dweight", &g.dweight),
                ("dbias", &g.dbias),
            ],
        );
    }
}

/// Deterministic values in [−2, 2) plus `offset`.
fn values(n: usize, seed: u64, offset: f64) -> Vec<f64> {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            offset + (z >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
        })
        .collect()
}

/// Central differences of `L(x, γ, β) = Σ dy·y` against the analytic gradients.
fn check_gradients(
    what: &str,
    x: &[f64],
    weight: &[f64],
    bias: &[f64],
    dy: &[f64],
    loss: impl Fn(&[f64], &[f64], &[f64]) -> f64,
    grads: &RefGrads,
) {
    let h = 1e-6;
    let numeric = |v: &[f64], i: usize, f: &dyn Fn(&[f64]) -> f64| {
        let (mut up, mut down) = (v.to_vec(), v.to_vec());
        up[i] += h;
        down[i] -= h;
        (f(&up) - f(&down)) / (2.0 * h)
    };
    let close = |name: &str, i: usize, analytic: f64, numeric: f64| {
        assert!(
            (analytic - numeric).abs() <= 1e-6 * (1.0 + numeric.abs()),
            "{what}: d{name}[{i}] analytic {analytic} vs numeric {numeric}"
        );
    };
    let _ = dy;
    for i in 0..x.len() {
        close("x", i, grads.dx[i], numeric(x, i, &|v| loss(v, weight, bias)));
    }
    for i in 0..grads.dweight.len() {
        close("weight", i, grads.dweight[i], numeric(weight, i, &|v| loss(x, v, bias)));
    }
    for i in 0..grads.dbias.len() {
        close("bias", i, grads.dbias[i], numeric(bias, i, &|v| loss(x, weight, v)));
    }
}

#[test]
fn rms_norm_backward_is_the_forward_derivative() {
    for (shape, norm, offset, affine) in [
        (vec![3, 5], vec![5], 0.0, true),
        (vec![2, 3, 4], vec![3, 4], 3.0, true),
        (vec![4, 1], vec![1], -1.0, true),
        (vec![2, 7], vec![7], 0.5, false),
    ] {
        let config = RmsNormConfig {
            normalized_shape: norm.clone(),
            eps: Some(1e-5),
            elementwise_affine: affine,
        };
        let n: usize = shape.iter().product();
        let w: usize = norm.iter().product();
        let (x, dy, weight) = (values(n, 1, offset), values(n, 2, 0.0), values(w, 3, 1.0));
        let gamma = affine.then_some(weight.as_slice());
        let f = rms_norm_forward(&x, &shape, &config, gamma).unwrap();
        let grads = rms_norm_backward(&x, &dy, &shape, &config, gamma, &f.rstd).unwrap();
        let loss = |x: &[f64], w: &[f64], _: &[f64]| {
            let y = rms_norm_forward(x, &shape, &config, affine.then_some(w)).unwrap().y;
            y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>()
        };
        check_gradients(&format!("rms {shape:?}"), &x, &weight, &[], &dy, loss, &grads);
    }
}

#[test]
fn group_norm_backward_is_the_forward_derivative() {
    for (shape, groups, offset, affine) in [
        (vec![2, 6, 3], 3, 0.0, true),
        (vec![1, 4, 2, 3], 1, 5.0, true),
        (vec![3, 4], 4, 0.0, true),
        (vec![2, 6, 2], 2, -2.0, false),
    ] {
        let c = shape[1];
        let config = GroupNormConfig {
            affine,
            ..GroupNormConfig::new(groups, c)
        };
        let n: usize = shape.iter().product();
        let (x, dy) = (values(n, 4, offset), values(n, 5, 0.0));
        let (weight, bias) = (values(c, 6, 1.0), values(c, 7, 0.0));
        let params = |w: &[f64], b: &[f64]| (affine.then_some(w.to_vec()), affine.then_some(b.to_vec()));
        let (gw, gb) = params(&weight, &bias);
        let f = group_norm_forward(&x, &shape, &config, gw.as_deref(), gb.as_deref()).unwrap();
        let grads = group_norm_backward(&x, &dy, &shape, &config, gw.as_deref(), &f.mean, &f.rstd).unwrap();
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let (w, b) = params(w, b);
            let y = group_norm_forward(x, &shape, &config, w.as_deref(), b.as_deref())
                .unwrap()
                .y;
            y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>()
        };
        check_gradients(
            &format!("gn {shape:?} G={groups}"),
            &x,
            &weight,
            &bias,
            &dy,
            loss,
            &grads,
        );
    }
}

#[test]
fn configurations_refuse_what_pytorch_refuses() {
    assert!(GroupNormConfig::new(4, 6).validate().is_err(), "C % G != 0");
    assert!(GroupNormConfig::new(0, 6).validate().is_err());
    assert!(GroupNormConfig::new(3, 6).dims(&[2, 5, 4]).is_err(), "C mismatch");
    assert!(GroupNormConfig::new(3, 6).dims(&[0, 6, 4]).is_err(), "empty");
    let gn = GroupNormConfig::new(3, 6).dims(&[2, 6, 4, 5]).unwrap();
    assert_eq!((gn.n, gn.groups, gn.channels_per_group, gn.spatial), (2, 3, 2, 20));
    assert_eq!(GroupNormConfig::instance_norm(5).num_groups, 5);
    let mut rms = RmsNormConfig::new(&[8]);
    assert_eq!(rms.eps(), f32::EPSILON);
    rms.eps = Some(0.0);
    assert!(rms.validate().is_err());
    rms.eps = Some(f32::NAN);
    assert!(rms.validate().is_err());
    assert!(RmsNormConfig::new(&[8]).rows_and_width(&[3, 7]).is_err());
    assert_eq!(RmsNormConfig::new(&[2, 4]).rows_and_width(&[3, 2, 4]).unwrap(), (3, 8));
    let e = RmsNormConfig::new(&[3, 1 << 62]).validate().unwrap_err();
    assert!(e.to_string().starts_with("rms_norm"), "{e}");
}
