//! `alignprop-pipeline`'s integration tests, one module per topic, linked into one test binary: all but
//! `bad_inputs.rs`, which counts the process's allocations (its own global allocator). One binary per file linked burn
//! into each (~180 MB apiece: gigabytes of a fresh clone's target/, and a CI machine ran out of disk). One module:
//! `cargo test -p alignprop-pipeline --test integration <module>::`.

mod lora_unet_parity;
mod sample_parity;
mod sd2_parity;
mod sdxl_parity;
mod shared;
mod tokenizer_fallback;
