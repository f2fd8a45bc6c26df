//! `alignprop-diffusion`'s integration tests, one module per topic, linked into one test binary: every integration
//! test of the crate. One binary per file linked burn into each (~180 MB apiece: gigabytes of a fresh clone's target/,
//! and a CI machine ran out of disk). One module: `cargo test -p alignprop-diffusion --test integration <module>::`.

#[path = "../common/mod.rs"]
mod common;

mod sd2_parity;
mod sdxl_parity;
mod sdxl_single_file;
mod single_file_models;
mod text_parity;
mod unet_parity;
mod vae_parity;
