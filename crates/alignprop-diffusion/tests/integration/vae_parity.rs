//! Parity of the burn `AutoencoderKL` with diffusers on the tiny SD1.5-topology fixture (`refs/vae.safetensors`,
//! README section 5(d)), plus loading variants (legacy attention names, SD1.5-era config, 1x1-conv shaped
//! attention weights) and loading errors.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use alignprop_diffusion::vae::{AutoencoderKL, AutoencoderKLConfig};
use alignprop_io::WeightError;
use alignprop_io::pipeline_files::read_json;
use alignprop_io::weights::VarBuilder;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use common::{B, assert_close, ref_tensor, refs, rel_err, tiny_sd};

/// f32 against the plain (float32) references.
const TOL_F32: f64 = 1e-4;
/// f64 against the `_f64` references.
const TOL_F64: f64 = 1e-6;

fn vae(dtype: DType) -> AutoencoderKL<B> {
    AutoencoderKL::load(&tiny_sd().join("vae"), &Default::default(), dtype).expect("tiny VAE loads")
}

fn ref4(key: &str, dtype: DType) -> Tensor<B, 4> {
    ref_tensor::<4>(&refs("vae.safetensors"), key, dtype)
}

/// Asserts bit-identical tensors (same weights, same operations).
#[track_caller]
fn assert_identical(what: &str, a: Tensor<B, 4>, b: Tensor<B, 4>) {
    let (rel, max_abs) = rel_err(a, b);
    eprintln!("{what}: rel L2 err {rel:.3e}, max abs {max_abs:.3e}");
    assert_eq!(
        max_abs, 0.0,
        "{what}: outputs differ (max abs {max_abs:.3e})"
    );
}

// ------------------------------------------------------------------------------------------------ decode

#[test]
fn decode_f32() {
    let vae = vae(DType::F32);
    let expected = ref4("decoded", DType::F32);
    let out = vae.decode(ref4("decoder_input", DType::F32));
    assert_eq!(out.dims(), [1, 3, 64, 48]);
    assert_close("decode(decoder_input) f32", out, expected.clone(), TOL_F32);
    let out = vae.decode_scaled(ref4("latents", DType::F32));
    assert_close("decode_scaled(latents) f32", out, expected, TOL_F32);
}

#[test]
fn decode_f64() {
    let vae = vae(DType::F64);
    let expected = ref4("decoded_f64", DType::F64);
    // The f64 reference divides the float32 latents by 0.18215 in float64: exactly decode_scaled.
    let out = vae.decode_scaled(ref4("latents", DType::F64));
    assert_eq!(out.dtype(), DType::F64);
    assert_close("decode_scaled(latents) f64", out, expected.clone(), TOL_F64);
    // `decoder_input` was divided in float32; its rounding (~3e-8) stays far below the tolerance.
    let out = vae.decode(ref4("decoder_input", DType::F64));
    assert_close("decode(decoder_input) f64", out, expected, TOL_F64);
}

/// Each decoder stage fed with diffusers' input to that stage, so a failure names the stage. The stage references
/// are float32, so an f64 model is held to the f32 tolerance here.
fn decode_stages(dtype: DType) {
    let vae = vae(dtype);
    let d = |stage: &str| ref4(&format!("debug.decode.{stage}"), dtype);
    let check = |stage: &str, out: Tensor<B, 4>| {
        assert_close(&format!("{stage} {dtype:?}"), out, d(stage), TOL_F32)
    };
    let pqc = vae.post_quant_conv.as_ref().expect("post_quant_conv");
    check("post_quant_conv", pqc.forward(ref4("decoder_input", dtype)));
    let dec = &vae.decoder;
    check("decoder.conv_in", dec.conv_in.forward(d("post_quant_conv")));
    check(
        "decoder.mid_block",
        dec.mid_block.forward(d("decoder.conv_in")),
    );
    let mut prev = "decoder.mid_block".to_string();
    for (i, block) in dec.up_blocks.iter().enumerate() {
        let stage = format!("decoder.up_blocks.{i}");
        check(&stage, block.forward(d(&prev)));
        prev = stage;
    }
    check("decoder.conv_norm_out", dec.conv_norm_out.forward(d(&prev)));
    let out = dec
        .conv_out
        .forward(dec.act.forward(d("decoder.conv_norm_out")));
    assert_close(
        &format!("decoder.conv_out {dtype:?}"),
        out,
        ref4("decoded", dtype),
        TOL_F32,
    );
}

#[test]
fn decode_stages_f32() {
    decode_stages(DType::F32);
}

#[test]
fn decode_stages_f64() {
    decode_stages(DType::F64);
}

// ------------------------------------------------------------------------------------------------ encode

#[test]
fn encode_f32() {
    let vae = vae(DType::F32);
    let r = |k: &str| ref4(k, DType::F32);
    let dist = vae.encode(r("image"));
    assert_eq!(dist.mean.dims(), [1, 4, 8, 6]);
    assert_close(
        "encode mean f32",
        dist.mean.clone(),
        r("encode_mean"),
        TOL_F32,
    );
    assert_close(
        "encode logvar f32",
        dist.logvar.clone(),
        r("encode_logvar"),
        TOL_F32,
    );
    assert_close("encode std f32", dist.std(), r("encode_std"), TOL_F32);
    assert_close(
        "encode sample f32",
        dist.sample(r("encode_noise")),
        r("encode_sample"),
        TOL_F32,
    );
    let scaled = vae.encode_scaled(r("image"), r("encode_noise"));
    assert_close(
        "encode_scaled f32",
        scaled,
        r("encode_sample_scaled"),
        TOL_F32,
    );
}

#[test]
fn encode_f64() {
    let vae = vae(DType::F64);
    let mean = vae.encode(ref4("image", DType::F64)).mean;
    assert_eq!(mean.dtype(), DType::F64);
    assert_close(
        "encode mean f64",
        mean,
        ref4("encode_mean_f64", DType::F64),
        TOL_F64,
    );
}

/// Each encoder stage fed with diffusers' input to that stage (float32 references, see `decode_stages`).
fn encode_stages(dtype: DType) {
    let vae = vae(dtype);
    let d = |stage: &str| ref4(&format!("debug.encode.{stage}"), dtype);
    let check = |stage: &str, out: Tensor<B, 4>| {
        assert_close(&format!("{stage} {dtype:?}"), out, d(stage), TOL_F32)
    };
    let enc = &vae.encoder;
    check("encoder.conv_in", enc.conv_in.forward(ref4("image", dtype)));
    let mut prev = "encoder.conv_in".to_string();
    for (i, block) in enc.down_blocks.iter().enumerate() {
        let stage = format!("encoder.down_blocks.{i}");
        check(&stage, block.forward(d(&prev)));
        prev = stage;
    }
    check("encoder.mid_block", enc.mid_block.forward(d(&prev)));
    let normed = enc.conv_norm_out.forward(d("encoder.mid_block"));
    check(
        "encoder.conv_out",
        enc.conv_out.forward(enc.act.forward(normed)),
    );
    let qc = vae.quant_conv.as_ref().expect("quant_conv");
    check("quant_conv", qc.forward(d("encoder.conv_out")));
}

#[test]
fn encode_stages_f32() {
    encode_stages(DType::F32);
}

#[test]
fn encode_stages_f64() {
    encode_stages(DType::F64);
}

// ------------------------------------------------------------------------------------------------ gradients

/// The value of a one-element tensor, read in its stored precision (`into_scalar` would round to f32 here).
fn scalar<Bk: Backend>(t: Tensor<Bk, 1>) -> f64 {
    t.into_data().iter::<f64>().next().expect("one element")
}

/// AlignProp back-propagates through the decoder: the autodiff gradient of `J = sum(decode_scaled(latents) * w)`
/// with respect to the latents, projected on a random direction `v`, against central finite differences (f64).
#[test]
fn decode_gradient_matches_finite_differences_f64() {
    type AD = burn::backend::Autodiff<B>;
    let dev = Default::default();
    let vae = AutoencoderKL::<AD>::load(&tiny_sd().join("vae"), &dev, DType::F64).expect("loads");
    let latents: Tensor<AD, 4> = Tensor::from_inner(ref4("latents", DType::F64));
    B::seed(&dev, 7);
    let normal = burn::tensor::Distribution::Normal(0.0, 1.0);
    let w = Tensor::<AD, 4>::random([1, 3, 64, 48], normal, (&dev, DType::F64));
    let v = Tensor::<AD, 4>::random(latents.dims(), normal, (&dev, DType::F64));
    let objective = |z: Tensor<AD, 4>| (vae.decode_scaled(z) * w.clone()).sum();

    let z = latents.clone().require_grad();
    let grads = objective(z.clone()).backward();
    let g = z.grad(&grads).expect("latents have a gradient");
    let analytic = scalar((g * v.clone().inner()).sum());

    let h = 1e-3;
    let j = |s: f64| scalar(objective(latents.clone() + v.clone() * s));
    // 4th-order central stencil.
    let numeric = (8.0 * (j(h) - j(-h)) - (j(2.0 * h) - j(-2.0 * h))) / (12.0 * h);
    let rel = (analytic - numeric).abs() / numeric.abs();
    eprintln!(
        "decode gradient: autodiff {analytic:.10e}, finite differences {numeric:.10e}, rel {rel:.2e}"
    );
    assert!(rel < 1e-7, "gradient mismatch: rel {rel:.2e}");
}

// ------------------------------------------------------------------------------------------------ loading variants

#[test]
fn legacy_attention_names_load_identically() {
    let dev = Default::default();
    let legacy = AutoencoderKL::<B>::load(&tiny_sd().join("extra/vae_legacy"), &dev, DType::F32)
        .expect("legacy VAE loads");
    let current = vae(DType::F32);
    let z = ref4("decoder_input", DType::F32);
    let out = legacy.decode(z.clone());
    assert_close(
        "legacy decode vs ref f32",
        out.clone(),
        ref4("decoded", DType::F32),
        TOL_F32,
    );
    assert_identical("legacy decode vs current decode", out, current.decode(z));
    let image = ref4("image", DType::F32);
    assert_identical(
        "legacy encode mean vs current",
        legacy.encode(image.clone()).mean,
        current.encode(image).mean,
    );
}

#[test]
fn sd15_style_config_builds_the_same_model() {
    let full: AutoencoderKLConfig = read_json(&tiny_sd().join("vae/config.json")).unwrap();
    let old: AutoencoderKLConfig =
        read_json(&tiny_sd().join("extra/sd15_style_configs/vae_config.json")).unwrap();
    // Every field that shapes the model or its use must agree (the old file lacks most of the newer keys).
    let effective = |c: &AutoencoderKLConfig| {
        serde_json::json!([
            c.in_channels,
            c.out_channels,
            c.down_block_types,
            c.up_block_types,
            c.block_out_channels,
            c.layers_per_block,
            c.act_fn,
            c.latent_channels,
            c.norm_num_groups,
            c.sample_size,
            c.scaling_factor,
            c.shift_factor,
            c.force_upcast,
            c.mid_block_add_attention,
            c.use_quant_conv,
            c.use_post_quant_conv
        ])
    };
    assert_eq!(effective(&old), effective(&full));
    assert_eq!(old.scaling_factor, 0.18215);

    let dev = Default::default();
    let files = [tiny_sd().join("vae/diffusion_pytorch_model.safetensors")];
    let build = |cfg: &AutoencoderKLConfig| {
        let vb = VarBuilder::<B>::from_safetensors(&files, &dev, DType::F32).unwrap();
        AutoencoderKL::new(cfg, &vb).expect("builds")
    };
    let (a, b) = (build(&full), build(&old));
    let z = ref4("latents", DType::F32);
    let out = b.decode_scaled(z.clone());
    assert_close(
        "sd15-style config decode vs ref",
        out.clone(),
        ref4("decoded", DType::F32),
        TOL_F32,
    );
    assert_identical(
        "sd15-style config decode vs full config",
        out,
        a.decode_scaled(z),
    );
}

#[test]
fn default_config_is_sd15() {
    let c = AutoencoderKLConfig::default();
    assert_eq!(c.block_out_channels, [128, 256, 512, 512]);
    assert_eq!(
        (c.layers_per_block, c.latent_channels, c.norm_num_groups),
        (2, 4, 32)
    );
    assert_eq!(c.scaling_factor, 0.18215);
    assert_eq!(c.downsample_factor(), 8);
    // An empty JSON object deserializes to the defaults.
    let empty: AutoencoderKLConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(
        serde_json::to_value(&empty).unwrap(),
        serde_json::to_value(&c).unwrap()
    );
}

/// A copy of the tiny VAE folder whose weights file is rewritten by `edit(key, shape)`: `None` drops the tensor,
/// `Some(shape)` stores the same bytes under a new shape.
fn edited_vae(name: &str, edit: impl Fn(&str, &[usize]) -> Option<Vec<usize>>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "alignprop_vae_parity_{}_{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let src = tiny_sd().join("vae");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut views = Vec::new();
    for (key, view) in st.tensors() {
        if let Some(shape) = edit(&key, view.shape()) {
            views.push((
                key,
                safetensors::tensor::TensorView::new(view.dtype(), shape, view.data()).unwrap(),
            ));
        }
    }
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), out).unwrap();
    dir
}

fn cleanup(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn conv_shaped_attention_weights_load() {
    // The original SD VAE stores the attention projections as 1x1 convolutions [C, C, 1, 1].
    let dir = edited_vae("conv_attn", |key, shape| {
        let mut s = shape.to_vec();
        if key.contains(".attentions.0.") && key.ends_with(".weight") && s.len() == 2 {
            s.extend([1, 1]);
        }
        Some(s)
    });
    let conv = AutoencoderKL::<B>::load(&dir, &Default::default(), DType::F32);
    cleanup(&dir);
    let z = ref4("decoder_input", DType::F32);
    assert_identical(
        "[C,C,1,1] attention weights decode",
        conv.expect("loads").decode(z.clone()),
        vae(DType::F32).decode(z),
    );
}

#[test]
fn wrong_shape_error_names_file_key_and_shapes() {
    let dir = edited_vae("wrong_shape", |key, shape| {
        Some(if key == "decoder.conv_in.weight" {
            vec![12, 8, 3, 3]
        } else {
            shape.to_vec()
        })
    });
    let err =
        AutoencoderKL::<B>::load(&dir, &Default::default(), DType::F32).expect_err("must fail");
    cleanup(&dir);
    let msg = err.to_string();
    eprintln!("{msg}");
    match err {
        WeightError::Shape {
            path,
            key,
            expected,
            found,
        } => {
            assert_eq!(path, dir.join("diffusion_pytorch_model.safetensors"));
            assert_eq!(key, "decoder.conv_in.weight");
            assert_eq!(expected, [24, 4, 3, 3]);
            assert_eq!(found, [12, 8, 3, 3]);
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    for part in [
        "diffusion_pytorch_model.safetensors",
        "decoder.conv_in.weight",
        "[24, 4, 3, 3]",
        "[12, 8, 3, 3]",
    ] {
        assert!(msg.contains(part), "message '{msg}' lacks '{part}'");
    }
}

#[test]
fn missing_tensor_error_names_file_and_key() {
    let dir = edited_vae("missing", |key, shape| {
        (key != "decoder.mid_block.attentions.0.to_v.weight").then(|| shape.to_vec())
    });
    let err =
        AutoencoderKL::<B>::load(&dir, &Default::default(), DType::F32).expect_err("must fail");
    cleanup(&dir);
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        matches!(err, WeightError::Missing { .. }),
        "expected a missing-tensor error, got {err:?}"
    );
    for part in [
        "decoder.mid_block.attentions.0.to_v.weight",
        "diffusion_pytorch_model.safetensors",
    ] {
        assert!(msg.contains(part), "message '{msg}' lacks '{part}'");
    }
}

#[test]
fn unsupported_configs_are_config_errors() {
    let vb = VarBuilder::<B>::random(&Default::default(), DType::F32);
    let check = |edit: &dyn Fn(&mut AutoencoderKLConfig), needle: &str| {
        let mut cfg = AutoencoderKLConfig {
            block_out_channels: vec![8, 16],
            down_block_types: vec!["DownEncoderBlock2D".into(); 2],
            up_block_types: vec!["UpDecoderBlock2D".into(); 2],
            norm_num_groups: 4,
            ..Default::default()
        };
        assert!(AutoencoderKL::new(&cfg, &vb).is_ok());
        edit(&mut cfg);
        match AutoencoderKL::new(&cfg, &vb) {
            Err(e @ WeightError::Config { .. }) => {
                let msg = e.to_string();
                eprintln!("{msg}");
                assert!(msg.contains(needle), "message '{msg}' lacks '{needle}'");
            }
            Err(e) => panic!("expected a config error, got {e:?}"),
            Ok(_) => panic!("config with '{needle}' accepted"),
        }
    };
    check(
        &|c| c.down_block_types[1] = "AttnDownEncoderBlock2D".into(),
        "AttnDownEncoderBlock2D",
    );
    check(
        &|c| c.up_block_types[0] = "AttnUpDecoderBlock2D".into(),
        "AttnUpDecoderBlock2D",
    );
    check(
        &|c| c.up_block_types.push("UpDecoderBlock2D".into()),
        "one entry per block_out_channels",
    );
    check(&|c| c.act_fn = "tanh".into(), "tanh");
    check(&|c| c.norm_num_groups = 3, "norm_num_groups");

    // Through `load`, the error names the config file.
    let dir = std::env::temp_dir().join(format!(
        "alignprop_vae_parity_{}_bad_config",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: serde_json::Value = read_json(&tiny_sd().join("vae/config.json")).unwrap();
    cfg["down_block_types"][0] = "SomethingElse2D".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err =
        AutoencoderKL::<B>::load(&dir, &Default::default(), DType::F32).expect_err("must fail");
    cleanup(&dir);
    eprintln!("{err}");
    match err {
        WeightError::Config { path, msg } => {
            assert_eq!(path, dir.join("config.json"));
            assert!(msg.contains("SomethingElse2D"));
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------------ full size

/// The full SD1.5 VAE (default config) with random weights: one 64x64 latent -> a 512x512 image.
/// `cargo test -p alignprop-diffusion --test integration -- --ignored --nocapture vae_parity::full_size`
#[test]
#[ignore = "full-size SD1.5 VAE: slow on CPU"]
fn full_size_sd15_decode_512() {
    let dev = Default::default();
    B::seed(&dev, 2026);
    let t0 = Instant::now();
    let vb = VarBuilder::<B>::random(&dev, DType::F32);
    let vae = AutoencoderKL::new(&AutoencoderKLConfig::default(), &vb).expect("builds");
    let built = t0.elapsed();
    let z = Tensor::<B, 4>::random(
        [1, 4, 64, 64],
        burn::tensor::Distribution::Normal(0.0, 1.0),
        (&dev, DType::F32),
    );
    let t1 = Instant::now();
    let image = vae.decode_scaled(z);
    let values: Vec<f32> = image.to_data().to_vec().unwrap();
    let decoded = t1.elapsed();
    assert_eq!(image.dims(), [1, 3, 512, 512]);
    assert!(values.iter().all(|v| v.is_finite()), "non-finite output");
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    eprintln!(
        "full-size SD1.5 VAE: {} params, built in {built:.2?}; decode [1,4,64,64] -> {:?} in {decoded:.2?} \
         (output mean {mean:.3e}, std {std:.3e})",
        burn::module::Module::num_params(&vae),
        image.dims()
    );
}
