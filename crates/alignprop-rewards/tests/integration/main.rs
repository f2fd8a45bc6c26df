//! `alignprop-rewards`'s integration tests, one module per topic, linked into one test binary: every integration test
//! of the crate. One binary per file linked burn into each (~180 MB apiece: gigabytes of a fresh clone's target/, and
//! a CI machine ran out of disk). One module: `cargo test -p alignprop-rewards --test integration <module>::`.

mod aesthetic_parity;
mod compressibility;
mod count_parity;
mod prompt_reward_parity;
mod reward_errors;
mod tiny_reward_parity;
