//! `alignprop-trainer`'s integration tests, one module per topic, linked into one test binary: all but four:
//! `faults.rs` injects process-wide storage faults, `memory.rs` and `memory_full_size.rs` count the process's
//! allocations (their own global allocator), `bad_inputs.rs` shares alignprop-io's mutation helpers. One binary per
//! file linked burn into each (~180 MB apiece: gigabytes of a fresh clone's target/, and a CI machine ran out of
//! disk). One module: `cargo test -p alignprop-trainer --test integration <module>::`.

#[path = "../common/mod.rs"]
mod common;

mod data_parallel;
mod gradient_parity;
mod method_parity;
mod sd2_gradient_parity;
mod sdxl_gradient_parity;
mod train_loop;
