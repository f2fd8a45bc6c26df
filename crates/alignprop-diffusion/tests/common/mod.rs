//! Helpers shared by the parity tests: fixture paths, reference tensors, tolerance checks.
#![allow(dead_code)]

use std::path::PathBuf;

use alignprop_diffusion::weights::{SafetensorsSource, TensorSource};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};

pub type B = alignprop_diffusion::device::Cpu;

/// The tiny SD1.5-topology fixture model (`tests/fixtures/tiny-sd`, made by `xtask/fixtures/make_fixtures.py`).
pub fn tiny_sd() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd")
}

/// A reference file under `tiny-sd/refs/`.
pub fn refs(name: &str) -> SafetensorsSource {
    SafetensorsSource::open(&[tiny_sd().join("refs").join(name)]).expect("reference file")
}

/// A float reference tensor, converted to `dtype`.
pub fn ref_tensor<const D: usize>(src: &SafetensorsSource, key: &str, dtype: DType) -> Tensor<B, D> {
    let raw = src.find(key).unwrap().unwrap_or_else(|| panic!("reference '{key}' missing"));
    assert_eq!(raw.shape.len(), D, "reference '{key}' has shape {:?}", raw.shape);
    Tensor::from_data(raw.data, (&Default::default(), dtype))
}

/// An integer reference tensor (token ids, timesteps).
pub fn ref_int<const D: usize>(src: &SafetensorsSource, key: &str) -> Tensor<B, D, Int> {
    let raw = src.find(key).unwrap().unwrap_or_else(|| panic!("reference '{key}' missing"));
    let v: Vec<i64> = raw.data.convert::<i64>().to_vec().unwrap();
    let data = burn::tensor::TensorData::new(v, raw.shape.clone());
    Tensor::from_data(data, &Default::default())
}

/// Relative L2 error `||a - b|| / ||b||` and max absolute difference, computed in f64.
pub fn rel_err<Bk: Backend, const D: usize>(actual: Tensor<Bk, D>, expected: Tensor<Bk, D>) -> (f64, f64) {
    assert_eq!(actual.dims(), expected.dims(), "shape mismatch");
    let a: Vec<f64> = actual.into_data().convert::<f64>().to_vec().unwrap();
    let e: Vec<f64> = expected.into_data().convert::<f64>().to_vec().unwrap();
    let (mut num, mut den, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(&e) {
        assert!(x.is_finite(), "non-finite output");
        num += (x - y) * (x - y);
        den += y * y;
        max_abs = max_abs.max((x - y).abs());
    }
    ((num / den.max(1e-300)).sqrt(), max_abs)
}

/// Asserts `actual` matches `expected` within relative L2 error `tol`.
#[track_caller]
pub fn assert_close<Bk: Backend, const D: usize>(what: &str, actual: Tensor<Bk, D>, expected: Tensor<Bk, D>, tol: f64) {
    let (rel, max_abs) = rel_err(actual, expected);
    eprintln!("{what}: rel L2 err {rel:.3e}, max abs {max_abs:.3e}");
    assert!(rel <= tol, "{what}: relative error {rel:.3e} > {tol:.1e} (max abs {max_abs:.3e})");
}
