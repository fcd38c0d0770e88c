#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nnscope_fuzz::index(data));
