//! Path normalization on arbitrary input: never a panic, and whatever is accepted is
//! canonical (`normalize::check_canonical`).
#![no_main]

#[path = "../../crates/platform/gateway/src/normalize.rs"]
#[allow(dead_code)]
mod normalize;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let input = format!("/{}", String::from_utf8_lossy(data));
    if let Err(e) = normalize::check_canonical(&input) {
        panic!("{e}");
    }
});
