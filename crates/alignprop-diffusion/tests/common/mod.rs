//! Helpers shared by the parity tests (see `alignprop_testing`), specialised to the CPU backend.
#![allow(dead_code)]

use alignprop_io::weights::SafetensorsSource;
use burn::tensor::{DType, Int, Tensor};

#[allow(unused_imports)]
pub use alignprop_testing::{assert_close, refs, rel_err, tiny_sd};

pub type B = alignprop_device::Cpu;

/// A fresh, empty scratch folder `<group>/<name>` under cargo's per-target temporary directory (removed first
/// when an earlier run left it).
pub fn scratch(group: &str, name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(group)
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

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

/// Compares every intermediate of a traced UNet forward with the forward-hook outputs a fixture stores under
/// `debug.*` (float32 references): the float32 timestep sinusoid (1e-6), the time embedding, SDXL's addition
/// embedding when the model has one, `conv_in`, every down block, the mid block, every up block, `conv_norm_out`
/// and `conv_out`, each within `tol`.
pub fn assert_trace(
    trace: alignprop_diffusion::unet::UNetTrace<B>,
    src: &SafetensorsSource,
    dtype: DType,
    tol: f64,
) {
    let r = |key: &str| format!("debug.{key}");
    // The sinusoid is float32 in every model dtype (as in diffusers).
    assert_eq!(trace.time_proj.dtype(), DType::F32);
    assert_close(
        "time_proj",
        trace.time_proj,
        ref_tensor(src, &r("time_proj"), DType::F32),
        1e-6,
    );
    assert_close(
        "time_embedding",
        trace.time_embedding,
        ref_tensor(src, &r("time_embedding"), dtype),
        tol,
    );
    if let Some(add) = trace.add_embedding {
        assert_close(
            "add_embedding",
            add,
            ref_tensor(src, &r("add_embedding"), dtype),
            tol,
        );
    }
    assert_close(
        "conv_in",
        trace.conv_in,
        ref_tensor(src, &r("conv_in"), dtype),
        tol,
    );
    for (i, h) in trace.down_blocks.into_iter().enumerate() {
        let key = format!("down_blocks.{i}");
        assert_close(&key, h, ref_tensor(src, &r(&key), dtype), tol);
    }
    assert_close(
        "mid_block",
        trace.mid_block.expect("mid block"),
        ref_tensor(src, &r("mid_block"), dtype),
        tol,
    );
    for (i, h) in trace.up_blocks.into_iter().enumerate() {
        let key = format!("up_blocks.{i}");
        assert_close(&key, h, ref_tensor(src, &r(&key), dtype), tol);
    }
    assert_close(
        "conv_norm_out",
        trace.conv_norm_out,
        ref_tensor(src, &r("conv_norm_out"), dtype),
        tol,
    );
    assert_close(
        "conv_out",
        trace.conv_out,
        ref_tensor(src, &r("conv_out"), dtype),
        tol,
    );
}
