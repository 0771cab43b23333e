//! Request targets → (model, version): any string a client sends, including broken percent-escapes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use servescope::routing::{Route, percent_decode, route};

fuzz_target!(|data: &[u8]| {
    // The parser hands the router the target as text, lossily decoded like this.
    let target = String::from_utf8_lossy(data);
    let first = route(&target);
    assert_eq!(first, route(&target), "routing is a pure function");
    if let Route::Inference { model, version } = &first {
        assert!(!version.is_empty(), "{target:?} → {first:?}");
        let _ = model;
    }
    let _ = percent_decode(&target);
});
