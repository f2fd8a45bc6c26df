//! Helpers shared by the parity tests (see `alignprop_testing`), specialised to the CPU backend.
#![allow(dead_code)]

use alignprop_io::weights::SafetensorsSource;
use burn::tensor::{DType, Int, Tensor};

#[allow(unused_imports)]
pub use alignprop_testing::{assert_close, refs, rel_err, tiny_sd};

pub type B = alignprop_device::Cpu;

/// A float reference tensor, converted to `dtype`.
pub fn ref_tensor<const D: usize>(
    src: &SafetensorsSource,
    key: &str,
    dtype: DType,
) -> Tensor<B, D> {
    alignprop_testing::ref_tensor_on(src, key, &Default::default(), dtype)
}

/// An integer reference tensor (token ids, timesteps).
pub fn ref_int<const D: usize>(src: &SafetensorsSource, key: &str) -> Tensor<B, D, Int> {
    alignprop_testing::ref_int_on(src, key, &Default::default())
}
