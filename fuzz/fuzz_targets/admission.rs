//! The sidecar-injection webhook's AdmissionReview (JSON from the API server): never panics, and every answer it
//! gives serialises as an AdmissionReview response.
#![no_main]

use ferry_control::kubernetes::webhook::{review, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let settings = ferry_api::kubernetes::inject::Settings::default();
    if let Ok(answer) = review(data, &settings) {
        let json = wire(answer);
        assert_eq!(json["kind"], "AdmissionReview", "{json}");
    }
});
