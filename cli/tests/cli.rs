//! The `normdrop` command as a user runs it. Needs a GPU adapter (lavapipe in CI), like the
//! library's GPU tests; `NORMDROP_ALLOW_NO_GPU=1` skips these explicitly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/torch")
}

fn normdrop(args: &[&str]) -> Option<Output> {
    let out = Command::new(env!("CARGO_BIN_EXE_normdrop"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("no GPU adapter") {
        if std::env::var("NORMDROP_ALLOW_NO_GPU").is_ok_and(|v| v == "1") {
            return None;
        }
        panic!("no GPU adapter (set NORMDROP_ALLOW_NO_GPU=1 to skip): {stderr}");
    }
    Some(out)
}

fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn info_names_the_adapter() {
    let Some(out) = normdrop(&["info"]) else {
        return;
    };
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let adapter = text
        .lines()
        .find(|l| l.starts_with("adapter"))
        .expect("an adapter line");
    assert!(adapter.split_whitespace().count() >= 2, "{adapter}");
    assert!(text.contains("max_storage_buffer_binding_size"));
}

#[test]
fn check_passes_every_fixture_forward() {
    let mut files: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    files.sort();
    assert_eq!(files.len(), 30);
    let args: Vec<&str> = std::iter::once("check")
        .chain(files.iter().map(String::as_str))
        .collect();
    let Some(out) = normdrop(&args) else { return };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // 78 BatchNorm, 39 LayerNorm, 27 RMSNorm and 40 GroupNorm tensors, gradients included;
    // nothing skipped.
    let last = last_line(&out);
    assert_eq!(last, "184 passed, 0 failed, 0 skipped");
    for (fixture, tensor) in [
        ("bn2d_train_offset", "y.0"),
        ("ln_offset", "y"),
        ("ln_odd_width", "rstd"),
        ("rms_eps_default", "rstd"),
        ("rms_f16", "dx"),
        ("gn_offset", "dx"),
        ("gn_one_group", "dweight"),
        ("gn_f16", "y"),
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(fixture) && l.contains(tensor) && l.contains(" ok ")),
            "{fixture} {tensor}"
        );
    }
}

#[test]
fn check_fails_on_a_wrong_expectation_and_on_a_missing_file() {
    // Perturb one expected value of a real fixture by far more than its tolerance.
    let bytes = std::fs::read(fixtures().join("bn2d_train_basic.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .iter()
        .map(|(n, v)| (n.to_string(), v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let y = owned.iter_mut().find(|t| t.0 == "y.0").unwrap();
    let v = f64::from_le_bytes(y.3[..8].try_into().unwrap()) + 0.5;
    y.3[..8].copy_from_slice(&v.to_le_bytes());
    let views: Vec<_> = owned
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let tampered = safetensors::serialize(views, meta.metadata().clone()).unwrap();
    let path = std::env::temp_dir().join(format!("normdrop-tampered-{}.safetensors", std::process::id()));
    std::fs::write(&path, tampered).unwrap();

    let Some(out) = normdrop(&["check", path.to_str().unwrap()]) else {
        return;
    };
    std::fs::remove_file(&path).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines().any(|l| l.contains("y.0") && l.contains("FAILED")),
        "{text}"
    );
    assert!(last_line(&out).contains(" 1 failed"), "{text}");

    let Some(out) = normdrop(&["check", "/nonexistent/fixture.safetensors"]) else {
        return;
    };
    assert_eq!(out.status.code(), Some(1));
    assert!(last_line(&out).starts_with("0 passed, 1 failed"), "{}", last_line(&out));
}

/// bn2d_train_basic with metadata entries replaced and only the tensors `keep` accepts, as a
/// fixture image.
fn retagged(changes: &[(&str, &str)], keep: impl Fn(&str, safetensors::Dtype) -> bool) -> Vec<u8> {
    let bytes = std::fs::read(fixtures().join("bn2d_train_basic.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut md = meta.metadata().clone().unwrap();
    for (k, v) in changes {
        md.insert(k.to_string(), v.to_string());
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<_> = st.iter().filter(|(n, v)| keep(n, v.dtype())).collect();
    safetensors::serialize(views, Some(md)).unwrap()
}

#[test]
fn check_fails_what_it_cannot_compare() {
    let expected = |_: &str, d: safetensors::Dtype| d == safetensors::Dtype::F64 || d == safetensors::Dtype::I64;
    let cases: [(&str, Vec<u8>, &str); 6] = [
        (
            "unknown-op",
            retagged(&[("op", "no_such_norm")], |_, _| true),
            "unknown op \"no_such_norm\"",
        ),
        (
            "config-of-another-op",
            retagged(&[("op", "group_norm")], |_, _| true),
            "config.num_groups missing or mistyped",
        ),
        (
            "nothing-expected",
            retagged(&[], |n, d| !expected(n, d)),
            "no expected tensors",
        ),
        ("nan-rtol", retagged(&[("rtol", "NaN")], |_, _| true), "`rtol` is NaN"),
        (
            "negative-atol",
            retagged(&[("atol", "-1e-3")], |_, _| true),
            "`atol` is -0.001",
        ),
        (
            "float64",
            retagged(&[("dtype", "float64")], |_, _| true),
            "dtype \"float64\"",
        ),
    ];
    for (label, image, why) in cases {
        let path = std::env::temp_dir().join(format!("normdrop-{label}-{}.safetensors", std::process::id()));
        std::fs::write(&path, image).unwrap();
        let Some(out) = normdrop(&["check", path.to_str().unwrap()]) else {
            return;
        };
        std::fs::remove_file(&path).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{label}: {text}");
        assert!(
            text.lines().any(|l| l.contains("FAILED") && l.contains(why)),
            "{label}: no FAILED line with {why:?}: {text}"
        );
        assert_eq!(last_line(&out), "0 passed, 1 failed, 0 skipped", "{label}");
    }
}

#[test]
fn bench_validates_times_and_writes_json_and_baseline_ratios() {
    let json = std::env::temp_dir().join(format!("normdrop-bench-{}.json", std::process::id()));
    let args = [
        "bench",
        "--quick",
        "--ops",
        "batch_norm_train_forward,dropout_forward,batch_norm_dropout_forward,layer_norm_forward",
        "--bn",
        "4x8x16x16",
        "--ln",
        "64x96",
        "--dropout",
        "65536",
        "--samples",
        "2",
        "--json",
        json.to_str().unwrap(),
    ];
    let Some(out) = normdrop(&args) else { return };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("validation: all 4 op/shape pairs match the CPU reference"),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("copy bandwidth:")), "{text}");
    let fused = text
        .lines()
        .find(|l| l.starts_with("batch_norm_dropout_forward"))
        .expect("a fused row");
    assert!(fused.trim_end().ends_with('x'), "fused rows carry a speedup: {fused}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["rows"].as_array().unwrap().len(), 4);
    // Every op sample is paired with a copy sample taken right after it: a row's percentage is
    // the median of its pairs' ratios and its copy figure the median of its copy samples; the
    // header's copy figure is the median of the first measurement and every row's.
    let median = |v: Vec<f64>| normdrop_cli::runners::percentiles(&v).0;
    let copy = report["copy_gb_per_s"].as_f64().unwrap();
    let runs: Vec<f64> = report["copy_runs_gb_per_s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(runs.len(), 5, "{runs:?}");
    assert!(runs.iter().all(|&r| r > 0.0), "{runs:?}");
    assert_eq!(copy, median(runs.clone()), "{copy} {runs:?}");
    // The copy reads and writes a buffer of copy_bytes.
    let copy_bytes = 2.0 * report["copy_bytes"].as_f64().unwrap();
    for (i, row) in report["rows"].as_array().unwrap().iter().enumerate() {
        let pairs: Vec<(f64, f64)> = row["pairs_us"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap()))
            .collect();
        assert_eq!(pairs.len(), 2, "one pair per sample: {row}");
        let op_median = median(pairs.iter().map(|p| p.0).collect());
        assert!(
            (row["median_us"].as_f64().unwrap() - op_median).abs() < 1e-9 * op_median,
            "{row}"
        );
        let row_copy = row["copy_gb_per_s"].as_f64().unwrap();
        let copy_median = median(pairs.iter().map(|p| copy_bytes / p.1 / 1e3).collect());
        assert!((row_copy - copy_median).abs() < 1e-9 * copy_median, "{row}");
        assert_eq!(row_copy, runs[i + 1], "{row} {runs:?}");
        // Minimal bytes of the op, from its GB/s and median.
        let bytes = row["gb_per_s"].as_f64().unwrap() * op_median * 1e3;
        let pct = median(
            pairs
                .iter()
                .map(|p| 100.0 * (bytes / p.0) / (copy_bytes / p.1))
                .collect(),
        );
        assert!((row["pct_of_copy"].as_f64().unwrap() - pct).abs() < 1e-6 * pct, "{row}");
    }

    // The same run against itself as a baseline gets a ratio column.
    let mut with_base: Vec<&str> = args[..args.len() - 2].to_vec();
    with_base.extend(["--baseline", json.to_str().unwrap()]);
    let Some(out) = normdrop(&with_base) else { return };
    std::fs::remove_file(&json).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("vs base"), "{text}");
    assert!(
        text.lines()
            .filter(|l| l.starts_with("batch_norm_train_forward"))
            .all(|l| l.trim_end().ends_with('x')),
        "{text}"
    );
}

#[test]
fn bench_runs_f16_on_both_storage_paths() {
    for packed in [false, true] {
        let mut args = vec![];
        if packed {
            args.push("--packed-f16");
        }
        args.extend([
            "bench",
            "--quick",
            "--dtype",
            "f16",
            "--ops",
            "batch_norm_train_backward,layer_norm_dropout_forward,dropout_forward",
            "--bn",
            "2x3x5x7",
            "--ln",
            "9x77",
            "--dropout",
            "1001",
            "--samples",
            "2",
        ]);
        let Some(out) = normdrop(&args) else { return };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("s = 2 bytes: f16"), "{text}");
        if packed {
            assert!(text.contains("packed in u32"), "{text}");
        }
        assert!(
            text.contains("validation: all 3 op/shape pairs match the CPU reference"),
            "{text}"
        );
    }
}

/// The command's bad-input catalogue: each bad argument or file is refused with a nonzero exit
/// status and a message naming the argument, never a panic and never a zero exit.
#[test]
fn bench_and_check_refuse_bad_input() {
    let garbage = std::env::temp_dir().join(format!("normdrop-garbage-{}.json", std::process::id()));
    std::fs::write(&garbage, "not json").unwrap();
    let garbage = garbage.to_str().unwrap().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["bench", "--bn", "4294967296x4294967296x2x2"], "--bn"),
        (&["bench", "--bn", "32x0x8x8"], "--bn"),
        (&["bench", "--ln", "1024x0"], "--ln"),
        (&["bench", "--ln", "1024x-5"], "--ln"),
        (&["bench", "--dropout", "3000000000"], "--dropout"),
        (&["bench", "--dropout", "abc"], "--dropout"),
        (&["bench", "--dropout", ""], "--dropout"),
        (&["bench", "--dtype", "f64"], "--dtype"),
        (&["bench", "--ops", "no_such_op"], "no_such_op"),
        (
            &["bench", "--baseline", "/nonexistent/baseline.json"],
            "/nonexistent/baseline.json",
        ),
        (&["bench", "--baseline", &garbage], "baseline"),
        (
            &["bench", "--json", "/nonexistent/dir/x.json", "--ops", "dropout_forward"],
            "/nonexistent/dir/x.json",
        ),
        (
            &["check", "/nonexistent/fixture.safetensors"],
            "/nonexistent/fixture.safetensors",
        ),
        (&["check", &garbage], "normdrop-garbage"),
        (&["no-such-command"], "no-such-command"),
    ];
    for (args, named) in cases {
        let Some(out) = normdrop(args) else { return };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{args:?} exited 0: {text}");
        assert!(!text.contains("panicked"), "{args:?} panicked: {text}");
        assert!(
            text.contains(named),
            "{args:?}: the output does not name {named:?}: {text}"
        );
    }
    std::fs::remove_file(&garbage).unwrap();
}

/// `selftest` exits 0 only when it checked something and nothing failed: a subset passes, a
/// fixture folder with one bad case fails (the good one still passes), and a filter that
/// matches nothing fails.
#[test]
fn selftest_fails_what_it_cannot_prove() {
    let Some(out) = normdrop(&["selftest", "--filter", "dropout2d_forward"]) else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let summary = last_line(&out);
    assert!(summary.contains(" passed, 0 failed"), "{summary}");
    assert!(!summary.starts_with("0 passed"), "{summary}");
    assert!(text.lines().any(|l| l.contains("subgroup sizes")), "{text}");

    let dir = std::env::temp_dir().join(format!("normdrop-selftest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        fixtures().join("ln_basic.safetensors"),
        dir.join("ln_basic.safetensors"),
    )
    .unwrap();
    std::fs::write(
        dir.join("bad.safetensors"),
        retagged(&[("op", "no_such_norm")], |_, _| true),
    )
    .unwrap();
    let Some(out) = normdrop(&["selftest", "--filter", "fixture", "--fixtures", dir.to_str().unwrap()]) else {
        return;
    };
    std::fs::remove_dir_all(&dir).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("bad") && l.contains("FAILED") && l.contains("no_such_norm")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.contains("ln_basic") && l.contains(" ok ")),
        "{text}"
    );
    assert!(last_line(&out).contains(" 1 failed"), "{}", last_line(&out));

    let Some(out) = normdrop(&["selftest", "--filter", "no check has this name"]) else {
        return;
    };
    assert_eq!(out.status.code(), Some(1));
    assert!(last_line(&out).starts_with("0 passed, 0 failed"), "{}", last_line(&out));
}
