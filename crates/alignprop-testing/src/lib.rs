//! Helpers for parity tests against the PyTorch reference fixtures (`tests/fixtures/tiny-sd`, made by
//! `xtask/fixtures/make_fixtures.py`; `tests/fixtures/tiny-sd2`, by `make_sd2_fixtures.py`): fixture paths,
//! reference tensors, error measures. Used by the tests of every crate of the workspace (as a dev-dependency);
//! handy for users checking their own ports too.
//! [`alloc`]: a counting allocator for memory tests. [`prompt_reward`]: the tiny HPSv2 / PickScore fixture models (`tests/fixtures/tiny-prompt-reward`).

pub mod alloc;
pub mod prompt_reward;

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use alignprop_io::{SafetensorsSource, TensorSource};

/// The repository's fixture folder (`tests/fixtures`): `$ALIGNPROP_FIXTURES` when set (a binary carried to another
/// machine, e.g. `alignprop-gpucheck` on a GPU host), else the source tree this crate was built from, else
/// `tests/fixtures` under the current directory.
pub fn fixtures_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("ALIGNPROP_FIXTURES") {
        return PathBuf::from(dir);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("tests/fixtures")
    }
}

/// The tiny SD1.5-topology fixture model of this repository (`tests/fixtures/tiny-sd`).
pub fn tiny_sd() -> PathBuf {
    fixtures_root().join("tiny-sd")
}

/// The tiny SD 2.1-topology (768-v, v-prediction) fixture model (`tests/fixtures/tiny-sd2`, made by
/// `xtask/fixtures/make_sd2_fixtures.py`; its README documents every file).
pub fn tiny_sd2() -> PathBuf {
    fixtures_root().join("tiny-sd2")
}

/// The tiny SDXL-base-topology fixture model (`tests/fixtures/tiny-sdxl`, made by
/// `xtask/fixtures/make_sdxl_fixtures.py`; its README documents every file).
pub fn tiny_sdxl() -> PathBuf {
    fixtures_root().join("tiny-sdxl")
}

/// The tiny CLIP vision tower and aesthetic head (`tests/fixtures/tiny-reward`).
pub fn tiny_reward() -> PathBuf {
    fixtures_root().join("tiny-reward")
}

/// A reference file under `tiny-sd/refs/`.
pub fn refs(name: &str) -> SafetensorsSource {
    SafetensorsSource::open(&[tiny_sd().join("refs").join(name)]).expect("reference file")
}

/// A reference file under `tiny-sd2/refs/`.
pub fn refs_sd2(name: &str) -> SafetensorsSource {
    SafetensorsSource::open(&[tiny_sd2().join("refs").join(name)]).expect("SD2 reference file")
}

/// A reference file under `tiny-sdxl/refs/`.
pub fn refs_sdxl(name: &str) -> SafetensorsSource {
    SafetensorsSource::open(&[tiny_sdxl().join("refs").join(name)]).expect("SDXL reference file")
}

/// A float reference tensor, converted to `dtype`, on `device`.
pub fn ref_tensor_on<B: Backend, const D: usize>(
    src: &SafetensorsSource,
    key: &str,
    device: &B::Device,
    dtype: DType,
) -> Tensor<B, D> {
    let raw = src
        .find(key)
        .unwrap()
        .unwrap_or_else(|| panic!("reference '{key}' missing"));
    assert_eq!(
        raw.shape.len(),
        D,
        "reference '{key}' has shape {:?}",
        raw.shape
    );
    Tensor::from_data(raw.data, (device, dtype))
}

/// An integer reference tensor (token ids, timesteps), on `device`.
pub fn ref_int_on<B: Backend, const D: usize>(
    src: &SafetensorsSource,
    key: &str,
    device: &B::Device,
) -> Tensor<B, D, Int> {
    let raw = src
        .find(key)
        .unwrap()
        .unwrap_or_else(|| panic!("reference '{key}' missing"));
    let v: Vec<i64> = raw.data.convert::<i64>().to_vec().unwrap();
    Tensor::from_data(TensorData::new(v, raw.shape.clone()), device)
}

/// The values of a reference tensor as f64.
pub fn ref_values(src: &SafetensorsSource, key: &str) -> Vec<f64> {
    let raw = src
        .find(key)
        .unwrap()
        .unwrap_or_else(|| panic!("reference '{key}' missing"));
    raw.data.convert::<f64>().to_vec().unwrap()
}

/// The values of any tensor as f64.
pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}

/// Relative L2 error `||a - b|| / ||b||` and max absolute difference of two value lists (panics on non-finite).
#[track_caller]
pub fn rel_err_values(a: &[f64], e: &[f64]) -> (f64, f64) {
    try_rel_err_values(a, e).unwrap_or_else(|m| panic!("{m}"))
}

/// [`rel_err_values`], with a length mismatch or a non-finite value in `a` as an error instead of a panic.
pub fn try_rel_err_values(a: &[f64], e: &[f64]) -> Result<(f64, f64), String> {
    if a.len() != e.len() {
        return Err(format!(
            "length mismatch: {} values, expected {}",
            a.len(),
            e.len()
        ));
    }
    if let Some(i) = a.iter().position(|x| !x.is_finite()) {
        return Err(format!("non-finite output: {} at index {i}", a[i]));
    }
    let (mut num, mut den, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(e) {
        num += (x - y) * (x - y);
        den += y * y;
        max_abs = max_abs.max((x - y).abs());
    }
    Ok(((num / den.max(1e-300)).sqrt(), max_abs))
}

/// Relative L2 error and max absolute difference of two tensors, computed in f64.
pub fn rel_err<B: Backend, const D: usize>(
    actual: Tensor<B, D>,
    expected: Tensor<B, D>,
) -> (f64, f64) {
    assert_eq!(actual.dims(), expected.dims(), "shape mismatch");
    rel_err_values(&values(actual), &values(expected))
}

/// Asserts `actual` matches `expected` within relative L2 error `tol` (and prints the errors).
#[track_caller]
pub fn assert_close<B: Backend, const D: usize>(
    what: &str,
    actual: Tensor<B, D>,
    expected: Tensor<B, D>,
    tol: f64,
) {
    let (rel, max_abs) = rel_err(actual, expected);
    eprintln!("{what}: rel L2 err {rel:.3e}, max abs {max_abs:.3e}");
    assert!(
        rel <= tol,
        "{what}: relative error {rel:.3e} > {tol:.1e} (max abs {max_abs:.3e})"
    );
}
