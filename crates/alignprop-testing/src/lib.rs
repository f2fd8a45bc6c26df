//! Helpers for parity tests against the PyTorch reference fixtures (`tests/fixtures/tiny-sd`, made by
//! `xtask/fixtures/make_fixtures.py`; `tests/fixtures/tiny-sd2`, by `make_sd2_fixtures.py`): fixture paths,
//! reference tensors, error measures. Used by the tests of every crate of the workspace (as a dev-dependency);
//! handy for users checking their own ports too.
//! [`alloc`]: a counting allocator for memory tests. [`prompt_reward`]: the tiny HPSv2 / PickScore fixture models (`tests/fixtures/tiny-prompt-reward`).

pub mod alloc;
pub mod prompt_reward;

use std::path::{Path, PathBuf};

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

/// Copies the networks' `config.json` files of the SDXL folder `model` (UNet, VAE, both text encoders) into
/// `to/<component>/config.json`: a `--configs` folder for single-file conversion.
pub fn copy_sdxl_network_configs(model: &Path, to: &Path) {
    for c in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        std::fs::create_dir_all(to.join(c)).unwrap();
        std::fs::copy(
            model.join(c).join("config.json"),
            to.join(c).join("config.json"),
        )
        .unwrap();
    }
}

/// SD 2.1 (768-v)'s real `unet/config.json` (linear projections, per-block head dims [5, 10, 20, 20], upcast
/// attention, 1024-wide text states), for the full-size tests with random weights.
pub const SD21_UNET_CONFIG: &str = r#"{
            "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
            "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": false, "cross_attention_dim": 1024,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
            "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
            "norm_num_groups": 32, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
            "sample_size": 96,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "use_linear_projection": true, "upcast_attention": true
        }"#;

/// SDXL base 1.0's real `unet/config.json` (`text_time` addition embedding, transformer depths [1, 2, 10],
/// 2048-wide text states, `upcast_attention: null`), for the full-size tests with random weights.
pub const SDXL_UNET_CONFIG: &str = r#"{
            "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
            "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280], "center_input_sample": false, "class_embed_type": null,
            "class_embeddings_concat": false, "conv_in_kernel": 3, "conv_out_kernel": 3,
            "cross_attention_dim": 2048, "cross_attention_norm": null,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
            "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
            "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
            "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
            "resnet_skip_time_act": false, "resnet_time_scale_shift": "default", "sample_size": 128,
            "time_cond_proj_dim": null, "time_embedding_act_fn": null, "time_embedding_dim": null,
            "time_embedding_type": "positional", "timestep_post_act": null,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "upcast_attention": null, "use_linear_projection": true
        }"#;

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
