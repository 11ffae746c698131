//! The demo page's work, in headless Chromium (scripts/test-web.sh): every row checked against
//! the CPU reference must pass, and the page's HTML must say so.
#![cfg(target_arch = "wasm32")]

use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen_test]
async fn the_demo_checks_every_op_and_all_pass() {
    let report = normdrop_web::report().await.unwrap();
    assert!(report.rows.len() >= 12, "{} rows", report.rows.len());
    for r in &report.rows {
        assert!(r.passed, "{}: max rel. error {:.2e}", r.op, r.max_rel_err);
        assert!(
            r.micros > 0.0 && r.gb_per_s.is_finite(),
            "{}: timing {} µs",
            r.op,
            r.micros
        );
    }
    let html = normdrop_web::render(&report);
    assert!(
        html.contains(&format!("{} passed, 0 failed", report.rows.len())),
        "{html}"
    );
    wasm_bindgen_test::console_log!("{html}");
}
