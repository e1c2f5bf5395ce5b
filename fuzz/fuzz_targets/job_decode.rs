//! Any bytes as a send job: the decoder answers a job or a specific error, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Err(e) = wa_sender::job::decode(body) {
        // Every refusal has a reason and a detail a producer can read.
        let _ = e.reason();
        assert!(!e.to_string().is_empty());
    }
});
