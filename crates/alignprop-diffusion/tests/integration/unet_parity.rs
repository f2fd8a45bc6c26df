//! `UNet2DConditionModel` against diffusers: the tiny SD1.5-topology fixture (`tiny-sd/unet`), the second
//! topology (`extra/unet_2block`), the SD1.5-era config, loader errors, and the full-size architecture.

use crate::common;

use std::path::Path;
use std::time::Instant;

use alignprop_diffusion::unet::{TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel};
use alignprop_io::WeightError;
use alignprop_io::weights::{SafetensorsSource, VarBuilder};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};
use common::{B, assert_close, assert_trace, ref_int, ref_tensor, refs, tiny_sd};

fn load(dir: &Path, dtype: DType) -> UNet2DConditionModel<B> {
    UNet2DConditionModel::load(dir, &Default::default(), dtype).expect("load unet")
}

/// `sample` [2,4,16,24], `timesteps` [2] (float values of the stored integers), `encoder_hidden_states` [2,77,32].
fn inputs(src: &SafetensorsSource, dtype: DType) -> (Tensor<B, 4>, Tensor<B, 1>, Tensor<B, 3>) {
    (
        ref_tensor(src, "sample", dtype),
        ref_int::<1>(src, "timesteps").float(),
        ref_tensor(src, "encoder_hidden_states", dtype),
    )
}

/// Compares every traced intermediate with the forward-hook outputs stored under `debug.*` (float32 refs).
fn check_trace(
    model: &UNet2DConditionModel<B>,
    src: &SafetensorsSource,
    dtype: DType,
    tol: f64,
) -> Tensor<B, 4> {
    let (sample, t, enc) = inputs(src, dtype);
    let (out, trace) = model.forward_traced(sample, t, enc, None);
    assert_trace(trace, src, dtype, tol);
    out
}

#[test]
fn unet_f32_matches_diffusers() {
    let src = refs("unet.safetensors");
    let model = load(&tiny_sd().join("unet"), DType::F32);
    let out = check_trace(&model, &src, DType::F32, 1e-4);
    assert_close("out f32", out, ref_tensor(&src, "out", DType::F32), 1e-4);
}

#[test]
fn unet_f64_matches_diffusers() {
    let src = refs("unet.safetensors");
    let model = load(&tiny_sd().join("unet"), DType::F64);
    // Intermediates exist as float32 refs only: they check the f64 path is the same computation.
    let out = check_trace(&model, &src, DType::F64, 1e-4);
    assert_eq!(out.dtype(), DType::F64);
    // The sinusoid is float32 as in diffusers, so f64 agrees far below the 1e-6 budget (measured ~1e-9; what
    // remains is the last-ulp difference of torch's and Rust's float32 sin/cos/exp).
    assert_close(
        "out f64",
        out,
        ref_tensor(&src, "out_f64", DType::F64),
        1e-8,
    );
}

#[test]
fn unet_scalar_timestep() {
    let src = refs("unet.safetensors");
    let t = ref_int::<1>(&src, "timestep_scalar")
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap()[0];
    assert_eq!(t, 501);
    let expected = || ref_tensor::<4>(&src, "out_timestep_scalar", DType::F32);
    for dtype in [DType::F32, DType::F64] {
        let model = load(&tiny_sd().join("unet"), dtype);
        let (sample, _, enc) = inputs(&src, dtype);
        let out = model.forward_with_timestep(sample, t as f64, enc);
        // Only a float32 reference exists; f64 must agree with it to float32 accuracy.
        assert_close(
            &format!("out_timestep_scalar {dtype:?}"),
            out.cast(DType::F32),
            expected(),
            1e-4,
        );
    }
}

#[test]
fn unet_2block_matches_diffusers() {
    let src = refs("unet_2block.safetensors");
    let dir = tiny_sd().join("extra/unet_2block");
    for (dtype, key, tol) in [(DType::F32, "out", 1e-4), (DType::F64, "out_f64", 1e-8)] {
        let model = load(&dir, dtype);
        let (sample, t, enc) = inputs(&src, dtype);
        let out = model.forward(sample, t, enc);
        assert_close(
            &format!("unet_2block {key}"),
            out,
            ref_tensor(&src, key, dtype),
            tol,
        );
    }
}

#[test]
fn sd15_style_config_gives_the_same_model() {
    let read = |p: &Path| -> UNet2DConditionConfig {
        alignprop_io::pipeline_files::read_json(p).expect("config parses")
    };
    let full = read(&tiny_sd().join("unet/config.json"));
    let old = read(&tiny_sd().join("extra/sd15_style_configs/unet_config.json"));
    assert_eq!(
        full, old,
        "the diffusers-0.6.0 key set must give the same effective config"
    );

    let device = Default::default();
    let weights = alignprop_io::pipeline_files::component_weights(&tiny_sd().join("unet")).unwrap();
    let vb = VarBuilder::<B>::from_safetensors(&weights, &device, DType::F32).unwrap();
    let model = UNet2DConditionModel::new(&old, &vb).expect("model from the SD1.5-style config");
    let src = refs("unet.safetensors");
    let (sample, t, enc) = inputs(&src, DType::F32);
    assert_close(
        "out (sd15-style config)",
        model.forward(sample, t, enc),
        ref_tensor(&src, "out", DType::F32),
        1e-4,
    );

    // The default config is SD1.5's.
    let sd15 = UNet2DConditionConfig::default();
    assert_eq!(sd15.block_out_channels, vec![320, 640, 1280, 1280]);
    let tiny_widths = UNet2DConditionConfig {
        block_out_channels: full.block_out_channels.clone(),
        attention_head_dim: full.attention_head_dim.clone(),
        norm_num_groups: full.norm_num_groups,
        cross_attention_dim: full.cross_attention_dim.clone(),
        sample_size: full.sample_size.clone(),
        ..sd15
    };
    assert_eq!(
        tiny_widths, full,
        "tiny config = SD1.5 config with tiny widths"
    );
}

#[test]
fn wrong_weights_name_key_and_shapes() {
    let device = Default::default();
    let main_cfg: UNet2DConditionConfig =
        alignprop_io::pipeline_files::read_json(&tiny_sd().join("unet/config.json")).unwrap();
    let two_block_dir = tiny_sd().join("extra/unet_2block");
    let two_block_files = alignprop_io::pipeline_files::component_weights(&two_block_dir).unwrap();
    let vb = VarBuilder::<B>::from_safetensors(&two_block_files, &device, DType::F32).unwrap();

    // Main config, 2-block weights: the first tensor read already has the wrong shape.
    let err = UNet2DConditionModel::new(&main_cfg, &vb).unwrap_err();
    let msg = err.to_string();
    eprintln!("shape error: {msg}");
    assert!(matches!(err, WeightError::Shape { .. }), "{msg}");
    for needle in [
        "conv_in.weight",
        "[8, 4, 3, 3]",
        "[12, 4, 3, 3]",
        "diffusion_pytorch_model.safetensors",
    ] {
        assert!(msg.contains(needle), "'{needle}' not in: {msg}");
    }

    // 2-block config with one more resnet per block: the weights lack `resnets.1`.
    let mut cfg: UNet2DConditionConfig =
        alignprop_io::pipeline_files::read_json(&two_block_dir.join("config.json")).unwrap();
    cfg.layers_per_block = alignprop_diffusion::unet::OneOrMany::One(2);
    let err = UNet2DConditionModel::new(&cfg, &vb).unwrap_err();
    let msg = err.to_string();
    eprintln!("missing error: {msg}");
    assert!(matches!(err, WeightError::Missing { .. }), "{msg}");
    assert!(
        msg.contains("down_blocks.0.resnets.1.norm1.weight"),
        "{msg}"
    );
}

#[test]
fn unsupported_configs_are_rejected() {
    let device = Default::default();
    let vb = VarBuilder::<B>::random(&device, DType::F32);
    let base: UNet2DConditionConfig =
        alignprop_io::pipeline_files::read_json(&tiny_sd().join("unet/config.json")).unwrap();
    let cases: Vec<(UNet2DConditionConfig, &str)> = vec![
        (
            UNet2DConditionConfig {
                down_block_types: vec![
                    "SimpleCrossAttnDownBlock2D".into(),
                    "CrossAttnDownBlock2D".into(),
                    "CrossAttnDownBlock2D".into(),
                    "DownBlock2D".into(),
                ],
                ..base.clone()
            },
            "SimpleCrossAttnDownBlock2D",
        ),
        (
            UNet2DConditionConfig {
                mid_block_type: Some("UNetMidBlock2DSimpleCrossAttn".into()),
                ..base.clone()
            },
            "UNetMidBlock2DSimpleCrossAttn",
        ),
        (
            UNet2DConditionConfig {
                up_block_types: vec!["UpBlock2D".into(); 3],
                ..base.clone()
            },
            "up_block_types",
        ),
        (
            UNet2DConditionConfig {
                addition_embed_type: Some("text_time".into()),
                ..base.clone()
            },
            "addition_embed_type",
        ),
    ];
    for (cfg, needle) in cases {
        let err = UNet2DConditionModel::new(&cfg, &vb).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, WeightError::Config { .. }) && msg.contains(needle),
            "{msg}"
        );
    }

    // Through `load`, the error names the config file.
    let dir = std::env::temp_dir().join(format!("unet-bad-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_sd().join("unet/config.json")).unwrap())
            .unwrap();
    json["up_block_types"][0] = "KUpBlock2D".into();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let err = UNet2DConditionModel::<B>::load(&dir, &device, DType::F32)
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        err.contains("config.json") && err.contains("KUpBlock2D"),
        "{err}"
    );
}

#[test]
fn config_variants_build() {
    // `attention_head_dim` as a list, `num_attention_heads` taking precedence, linear projections (SD2 style),
    // odd latent sizes (upsampling to the skip's size): random weights, shapes only.
    let device = Default::default();
    let base: UNet2DConditionConfig =
        alignprop_io::pipeline_files::read_json(&tiny_sd().join("unet/config.json")).unwrap();
    let cfg = UNet2DConditionConfig {
        attention_head_dim: alignprop_diffusion::unet::OneOrMany::Many(vec![1, 2, 4, 4]),
        num_attention_heads: Some(alignprop_diffusion::unet::OneOrMany::One(2)),
        use_linear_projection: true,
        ..base
    };
    let vb = VarBuilder::<B>::random(&device, DType::F32);
    let mut model = UNet2DConditionModel::new(&cfg, &vb).unwrap();
    let attn = model.attentions_mut();
    assert_eq!(attn.len(), 32, "16 transformer blocks, 2 attentions each");
    assert_eq!(
        attn[0].0,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    );
    assert!(attn.iter().all(|(_, a)| a.heads == 2));
    let sample = Tensor::<B, 4>::random(
        [1, 4, 13, 7],
        Distribution::Normal(0.0, 1.0),
        (&device, DType::F32),
    );
    let enc = Tensor::<B, 3>::random(
        [1, 5, 32],
        Distribution::Normal(0.0, 1.0),
        (&device, DType::F32),
    );
    let out = model.forward_with_timestep(sample, 10.5, enc);
    assert_eq!(out.dims(), [1, 4, 13, 7]);
}

/// Builds a full-size UNet from `cfg` with random weights, checks its parameter count against `params`, and runs one
/// forward on a `[1, 4, latent, latent]` sample with `[1, 77, text]` text states (finite output of the same shape);
/// prints the build and forward times. `pooled`: the width of SDXL's pooled text embeddings (the `text_time`
/// conditioning gets random ones and the time ids of a `8 * latent` square image).
fn full_size_random_forward(
    name: &str,
    cfg: &UNet2DConditionConfig,
    params: usize,
    latent: usize,
    text: usize,
    pooled: Option<usize>,
) {
    let device = Default::default();
    B::seed(&device, 20261122);
    let vb = VarBuilder::<B>::random(&device, DType::F32);
    let start = Instant::now();
    let model = UNet2DConditionModel::new(cfg, &vb).unwrap();
    let n_params = model.num_params();
    println!(
        "{name} UNet: {n_params} parameters, built in {:.2?}",
        start.elapsed()
    );
    assert_eq!(n_params, params);
    let sample = Tensor::<B, 4>::random(
        [1, 4, latent, latent],
        Distribution::Normal(0.0, 1.0),
        (&device, DType::F32),
    );
    let enc = Tensor::<B, 3>::random(
        [1, 77, text],
        Distribution::Normal(0.0, 1.0),
        (&device, DType::F32),
    );
    let added = pooled.map(|p| {
        let side = (8 * latent) as f64;
        TextTimeCond {
            text_embeds: Tensor::<B, 2>::random(
                [1, p],
                Distribution::Normal(0.0, 1.0),
                (&device, DType::F32),
            ),
            time_ids: TextTimeCond::<B>::time_ids(
                [side, side, 0.0, 0.0, side, side],
                1,
                &device,
                DType::F32,
            ),
        }
    });
    let start = Instant::now();
    let out = model.forward_added_with_timestep(sample, 981.0, enc, added.as_ref());
    let values: Vec<f32> = out.clone().into_data().convert::<f32>().to_vec().unwrap();
    println!(
        "forward 1x4x{latent}x{latent}, 77x{text} text states: {:.2?}",
        start.elapsed()
    );
    assert_eq!(out.dims(), [1, 4, latent, latent]);
    assert!(values.iter().all(|v| v.is_finite()), "non-finite output");
}

/// The full-size SD1.5 UNet with random weights: architecture, parameter count and one forward pass.
#[test]
#[ignore = "full-size SD1.5 UNet: ~3.4 GB of float32 parameters and a long CPU forward"]
fn full_size_sd15_random_forward() {
    full_size_random_forward(
        "SD1.5",
        &UNet2DConditionConfig::default(),
        859_520_964,
        64,
        768,
        None,
    );
}

/// The full-size SD 2.1 (768-v) UNet from its real `unet/config.json` (linear projections, per-block head dims
/// [5, 10, 20, 20], upcast attention, 1024-wide text states) with random weights: parameter count (diffusers':
/// 865,910,724) and one forward at a small latent size.
#[test]
#[ignore = "full-size SD 2.1 UNet: ~3.5 GB of float32 parameters and a long CPU forward"]
fn full_size_sd21_random_forward() {
    let cfg: UNet2DConditionConfig =
        serde_json::from_str(alignprop_testing::SD21_UNET_CONFIG).unwrap();
    full_size_random_forward("SD 2.1", &cfg, 865_910_724, 32, 1024, None);
}

/// The full-size SDXL base 1.0 UNet from its real `unet/config.json` (`text_time` addition embedding, transformer
/// depths [1, 2, 10], 2048-wide text states, `upcast_attention: null`) with random weights: parameter count
/// (diffusers': 2,567,463,684) and one forward at a small latent size with pooled embeddings and time ids.
#[test]
#[ignore = "full-size SDXL UNet: ~10.3 GB of float32 parameters and a long CPU forward"]
fn full_size_sdxl_random_forward() {
    let cfg: UNet2DConditionConfig =
        serde_json::from_str(alignprop_testing::SDXL_UNET_CONFIG).unwrap();
    full_size_random_forward("SDXL", &cfg, 2_567_463_684, 32, 2048, Some(1280));
}
