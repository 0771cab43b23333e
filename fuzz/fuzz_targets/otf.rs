//! TorchServe's frontend → worker frames (OTF): only request ids come out, each well-formed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use servescope::otf::inference_request_ids;

fuzz_target!(|data: &[u8]| {
    if let Some(ids) = inference_request_ids(data) {
        assert!(!ids.is_empty());
        for id in ids {
            assert!(!id.is_empty() && id.len() <= 128, "{id:?}");
            assert!(
                id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                "{id:?}"
            );
        }
    }
});
