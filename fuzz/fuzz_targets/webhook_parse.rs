//! Any bytes as a signed webhook body: the parser answers updates, parts to park, or an error
//! for the whole body; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let _ = wa_sender::webhook::payload::parse(body);
});
