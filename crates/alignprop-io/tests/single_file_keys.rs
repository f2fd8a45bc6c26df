//! The single-file (original CompVis/ldm layout) key mapping against the tiny fixture: every tensor of the diffusers
//! files is found under its mapped name in `single_file/tiny-sd15.safetensors` with identical bytes, every tensor of
//! the single file is reached, the float16 copy holds the float32 values rounded to float16, and files that are not
//! SD1.x original checkpoints are refused with a clear message. No model code is involved.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use alignprop_io::VarBuilder;
use alignprop_io::single_file::{
    self, InferredTextEncoder, InferredVae, SingleFileCheckpoint, SingleFileUnetLayout, clip_key,
    unet_key, vae_key,
};
use alignprop_io::weights::{Init, RawTensor, SafetensorsSource, TensorSource, WeightError};
use alignprop_testing::tiny_sd;
use burn::tensor::{DType, Tensor};

type B = burn::backend::Flex;
use serde_json::Value;

fn single_file(name: &str) -> PathBuf {
    tiny_sd().join("single_file").join(name)
}

fn open(path: &Path) -> SafetensorsSource {
    SafetensorsSource::open(&[path]).unwrap_or_else(|e| panic!("{e}"))
}

fn config(component: &str) -> Value {
    let text = std::fs::read_to_string(tiny_sd().join(component).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// The UNet layout from the tiny model's `unet/config.json` (independent of the inference from the file).
fn unet_layout_from_config() -> SingleFileUnetLayout {
    let cfg = config("unet");
    let up: Vec<&str> = cfg["up_block_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    SingleFileUnetLayout::from_block_types(cfg["layers_per_block"].as_u64().unwrap() as usize, &up)
}

/// `shape` without trailing 1s (a 1x1 convolution `[C, C, 1, 1]` stored for a linear `[C, C]`).
fn squeezed(shape: &[usize]) -> &[usize] {
    let mut n = shape.len();
    while n > 1 && shape[n - 1] == 1 {
        n -= 1;
    }
    &shape[..n]
}

fn f32s(raw: &RawTensor) -> Vec<f32> {
    assert_eq!(raw.data.dtype, DType::F32, "{}", raw.stored_key);
    raw.data
        .as_bytes()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn f16s(raw: &RawTensor) -> Vec<half::f16> {
    assert_eq!(raw.data.dtype, DType::F16, "{}", raw.stored_key);
    raw.data
        .as_bytes()
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Checks every tensor of a diffusers file against the single file through a renaming source; returns the stored
/// (original-layout) keys it reached.
fn check_component(
    what: &str,
    diffusers_file: &Path,
    renamed: &dyn TensorSource,
    pure_map: &dyn Fn(&str) -> String,
    skip: &dyn Fn(&str) -> bool,
) -> BTreeSet<String> {
    let diffusers = open(diffusers_file);
    let mut reached = BTreeSet::new();
    let (mut n, mut reshaped) = (0, 0);
    for key in diffusers.keys() {
        if skip(&key) {
            continue;
        }
        let stored = renamed.stored_key(&key);
        assert_eq!(
            stored,
            pure_map(&key),
            "{what}: the source and the pure mapping disagree for '{key}'"
        );
        let expected = diffusers.find(&key).unwrap().unwrap();
        let found = renamed
            .find(&key)
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: '{key}' -> '{stored}' is not in the single file"));
        assert_eq!(found.stored_key, stored);
        assert_eq!(
            found.data.dtype, expected.data.dtype,
            "{what}: dtype of '{key}'"
        );
        if found.shape != expected.shape {
            assert_eq!(
                squeezed(&found.shape),
                squeezed(&expected.shape),
                "{what}: '{key}' {:?} vs '{stored}' {:?}",
                expected.shape,
                found.shape
            );
            assert_eq!(
                found.shape.len(),
                4,
                "{what}: only [C,C] vs [C,C,1,1] may differ ('{key}')"
            );
            reshaped += 1;
        }
        assert!(
            found.data.as_bytes() == expected.data.as_bytes(),
            "{what}: bytes of '{key}' differ from '{stored}'"
        );
        assert!(
            reached.insert(stored.clone()),
            "{what}: two keys map to '{stored}'"
        );
        n += 1;
    }
    eprintln!(
        "{what}: {n} tensors equal under their original names ({reshaped} stored as [C,C,1,1])"
    );
    assert!(n > 0);
    reached
}

#[test]
fn every_diffusers_tensor_is_in_the_single_file_with_equal_bytes() {
    let ckpt = SingleFileCheckpoint::open(single_file("tiny-sd15.safetensors"))
        .unwrap_or_else(|e| panic!("{e}"));
    let layout = unet_layout_from_config();
    assert_eq!(
        ckpt.unet_info().layout,
        layout,
        "layout inferred from the file vs unet/config.json"
    );
    let n_up = ckpt.vae_info().num_up_blocks;
    assert_eq!(
        n_up,
        config("vae")["up_block_types"].as_array().unwrap().len()
    );

    let none = |_: &str| false;
    let mut reached = check_component(
        "unet",
        &tiny_sd().join("unet/diffusion_pytorch_model.safetensors"),
        &ckpt.unet(),
        &|k| unet_key(&layout, k),
        &none,
    );
    let vae = check_component(
        "vae",
        &tiny_sd().join("vae/diffusion_pytorch_model.safetensors"),
        &ckpt.vae(),
        &|k| vae_key(n_up, k),
        &none,
    );
    // The same VAE with the pre-0.14 attention names (query/key/value/proj_attn) reaches the same tensors.
    let legacy = check_component(
        "vae_legacy",
        &tiny_sd().join("extra/vae_legacy/diffusion_pytorch_model.safetensors"),
        &ckpt.vae(),
        &|k| vae_key(n_up, k),
        &none,
    );
    assert_eq!(vae, legacy);
    reached.extend(vae);
    let text = check_component(
        "text_encoder",
        &tiny_sd().join("text_encoder/model.safetensors"),
        &ckpt.text_encoder(),
        &clip_key,
        &|k| k.ends_with("position_ids"),
    );
    reached.extend(text);

    // Every tensor of the single file is reached, but the known non-network ones.
    let all: BTreeSet<String> = ckpt.source().keys().into_iter().collect();
    let leftovers: Vec<&String> = all.difference(&reached).collect();
    for k in &leftovers {
        assert!(
            single_file::is_ignorable_key(k),
            "tensor '{k}' of the single file is reached by no mapping"
        );
    }
    let buffers: BTreeSet<&str> = single_file::SCHEDULE_BUFFERS.iter().copied().collect();
    let left: BTreeSet<&str> = leftovers.iter().map(|k| k.as_str()).collect();
    assert_eq!(
        left,
        buffers
            .into_iter()
            .chain(["cond_stage_model.transformer.text_model.embeddings.position_ids"])
            .collect()
    );
    assert!(ckpt.unknown_keys().is_empty(), "{:?}", ckpt.unknown_keys());
    eprintln!(
        "single file: {} tensors, {} reached, {} ignorable leftovers",
        all.len(),
        reached.len(),
        leftovers.len()
    );
}

#[test]
fn the_structure_is_inferred_from_the_shapes() {
    let ckpt = SingleFileCheckpoint::open(single_file("tiny-sd15.safetensors")).unwrap();
    let (u, v, t) = (config("unet"), config("vae"), config("text_encoder"));
    let unet = ckpt.unet_info();
    assert_eq!(unet.block_out_channels, usizes(&u["block_out_channels"]));
    assert_eq!(
        unet.in_channels,
        u["in_channels"].as_u64().unwrap() as usize
    );
    assert_eq!(
        unet.out_channels,
        u["out_channels"].as_u64().unwrap() as usize
    );
    assert_eq!(
        unet.cross_attention_dim,
        Some(u["cross_attention_dim"].as_u64().unwrap() as usize)
    );
    assert!(!unet.use_linear_projection);
    let down: Vec<bool> = u["down_block_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().contains("CrossAttn"))
        .collect();
    assert_eq!(unet.down_block_has_attention, down);
    assert_eq!(
        ckpt.vae_info(),
        &InferredVae {
            block_out_channels: usizes(&v["block_out_channels"]),
            layers_per_block: v["layers_per_block"].as_u64().unwrap() as usize,
            num_up_blocks: v["up_block_types"].as_array().unwrap().len(),
            latent_channels: v["latent_channels"].as_u64().unwrap() as usize,
            in_channels: 3,
            out_channels: 3,
        }
    );
    assert_eq!(
        ckpt.text_encoder_info(),
        &InferredTextEncoder {
            vocab_size: t["vocab_size"].as_u64().unwrap() as usize,
            hidden_size: t["hidden_size"].as_u64().unwrap() as usize,
            intermediate_size: t["intermediate_size"].as_u64().unwrap() as usize,
            num_hidden_layers: t["num_hidden_layers"].as_u64().unwrap() as usize,
            max_position_embeddings: t["max_position_embeddings"].as_u64().unwrap() as usize,
        }
    );
    eprintln!("{ckpt:?}");
}

#[test]
fn fp16_single_file_holds_the_float32_values_rounded() {
    let f32_path = single_file("tiny-sd15.safetensors");
    let f16_path = single_file("tiny-sd15.fp16.safetensors");
    let full = open(&f32_path);
    let ckpt16 = SingleFileCheckpoint::open(&f16_path).unwrap_or_else(|e| panic!("{e}"));
    let ckpt32 = SingleFileCheckpoint::open(&f32_path).unwrap();
    assert_eq!(ckpt16.unet_info(), ckpt32.unet_info());
    assert_eq!(ckpt16.vae_info(), ckpt32.vae_info());
    assert_eq!(ckpt16.text_encoder_info(), ckpt32.text_encoder_info());
    let half = ckpt16.source();
    assert_eq!(full.keys(), half.keys());
    let (mut max_rel, mut n_values, mut n_ints) = (0f64, 0usize, 0usize);
    for key in full.keys() {
        let a = full.find(&key).unwrap().unwrap();
        let h = half.find(&key).unwrap().unwrap();
        assert_eq!(a.shape, h.shape, "{key}");
        if a.data.dtype != DType::F32 {
            assert_eq!(
                a.data.dtype, h.data.dtype,
                "{key}: non-float tensors keep their dtype"
            );
            assert!(a.data.as_bytes() == h.data.as_bytes(), "{key}");
            n_ints += 1;
            continue;
        }
        for (x, y) in f32s(&a).into_iter().zip(f16s(&h)) {
            // torch's .half() rounds to nearest even, as half::f16::from_f32.
            assert_eq!(
                y.to_bits(),
                half::f16::from_f32(x).to_bits(),
                "{key}: {x} stored as {y}"
            );
            let err = (f64::from(y.to_f32()) - f64::from(x)).abs();
            if x.abs() >= half::f16::MIN_POSITIVE.to_f32() {
                max_rel = max_rel.max(err / f64::from(x.abs()));
            } else {
                assert!(err <= 2f64.powi(-25), "{key}: subnormal {x} -> {y}");
            }
            n_values += 1;
        }
    }
    eprintln!(
        "fp16 single file: {n_values} values equal to f16(f32 value), max rel rounding {max_rel:.2e}; {n_ints} int tensors"
    );
    assert!(max_rel <= 2f64.powi(-11));
}

#[test]
fn a_var_builder_reads_the_networks_through_the_checkpoint() {
    let device = Default::default();
    let ckpt = SingleFileCheckpoint::open(single_file("tiny-sd15.safetensors")).unwrap();
    let vae_file = open(&tiny_sd().join("vae/diffusion_pytorch_model.safetensors"));
    let expected = |key: &str| {
        let raw = vae_file.find(key).unwrap().unwrap();
        Tensor::<B, 2>::from_data(raw.data, (&device, DType::F32))
    };

    // A linear [C, C] read from the original 1x1 conv [C, C, 1, 1], under the current and the legacy name.
    let vb = VarBuilder::<B>::from_source(ckpt.vae(), &device, DType::F32)
        .pp("decoder.mid_block.attentions.0");
    let c = ckpt.vae_info().block_out_channels.last().copied().unwrap();
    let q: Tensor<B, 2> = vb.get([c, c], "to_q.weight", Init::Zeros).unwrap();
    let q_legacy: Tensor<B, 2> = vb
        .get_any([c, c], &["query.weight", "to_q.weight"], Init::Zeros)
        .unwrap();
    let q_ref = expected("decoder.mid_block.attentions.0.to_q.weight");
    assert!(q.clone().equal(q_ref.clone()).all().into_scalar());
    assert!(q_legacy.equal(q_ref).all().into_scalar());

    // The float16 file through the same builder: float32 tensors within float16 rounding.
    let ckpt16 = SingleFileCheckpoint::open(single_file("tiny-sd15.fp16.safetensors")).unwrap();
    let vb16 = VarBuilder::<B>::from_source(ckpt16.vae(), &device, DType::F32)
        .pp("decoder.mid_block.attentions.0");
    let q16: Tensor<B, 2> = vb16.get([c, c], "to_q.weight", Init::Zeros).unwrap();
    assert_eq!(q16.dtype(), DType::F32);
    let (rel, _) = alignprop_testing::rel_err(q16, q);
    eprintln!("to_q from the fp16 file: rel err {rel:.2e}");
    assert!(rel > 0.0 && rel < 1e-3);

    // The text encoder with and without transformers' `text_model.` prefix.
    let tvb = VarBuilder::<B>::from_source(ckpt.text_encoder(), &device, DType::F32);
    let t = ckpt.text_encoder_info();
    let shape = [t.vocab_size, t.hidden_size];
    let a: Tensor<B, 2> = tvb
        .get(
            shape,
            "text_model.embeddings.token_embedding.weight",
            Init::Zeros,
        )
        .unwrap();
    let b: Tensor<B, 2> = tvb
        .get(shape, "embeddings.token_embedding.weight", Init::Zeros)
        .unwrap();
    assert!(a.equal(b).all().into_scalar());
    assert!(tvb.contains("text_model.final_layer_norm.weight"));

    // A tensor the file does not have: the error names the stored key and the model's key.
    // (One resnet beyond the layout: it must not alias the next block.)
    let uvb = VarBuilder::<B>::from_source(ckpt.unet(), &device, DType::F32);
    let (lpb, c0) = (
        ckpt.unet_info().layout.layers_per_block,
        ckpt.unet_info().block_out_channels[0],
    );
    let last = format!("down_blocks.0.resnets.{}.norm1.weight", lpb - 1);
    let beyond = format!("down_blocks.0.resnets.{lpb}.norm1.weight");
    let norm: Tensor<B, 1> = uvb.get([c0], &last, Init::Zeros).unwrap();
    assert_eq!(norm.dims(), [c0]);
    let err = uvb
        .get::<1>([c0], &beyond, Init::Zeros)
        .unwrap_err()
        .to_string();
    eprintln!("missing: {err}");
    assert!(
        err.contains(&format!(
            "tensor 'model.diffusion_model.{beyond}' not found"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("(the model's tensor '{beyond}')")),
        "{err}"
    );
}

#[test]
fn files_that_are_not_sd1_checkpoints_are_refused_clearly() {
    let expect_config_error = |path: PathBuf, hint: &str| {
        let err = SingleFileCheckpoint::open(&path).unwrap_err();
        assert!(matches!(err, WeightError::Config { .. }), "{err:?}");
        let msg = err.to_string();
        eprintln!("{msg}");
        assert!(
            msg.contains(&path.display().to_string()),
            "names the file: {msg}"
        );
        assert!(
            msg.contains("model.diffusion_model.input_blocks.0.0.weight"),
            "names the expected tensor: {msg}"
        );
        assert!(msg.contains("Stable Diffusion 1.x"), "{msg}");
        assert!(msg.contains(hint), "'{hint}' in: {msg}");
    };
    expect_config_error(
        tiny_sd().join("unet/diffusion_pytorch_model.safetensors"),
        "diffusers UNet file",
    );
    expect_config_error(
        tiny_sd().join("vae/diffusion_pytorch_model.safetensors"),
        "diffusers VAE file",
    );
    expect_config_error(
        tiny_sd().join("text_encoder/model.safetensors"),
        "CLIP text-encoder file",
    );
    expect_config_error(
        tiny_sd().join("refs/unet.safetensors"),
        "its first tensors are",
    );

    // SDXL-like files or no text encoder: the UNet marker is there, neither the SD1.x CLIP text encoder nor the
    // SD2.x OpenCLIP tower is.
    let dir =
        std::env::temp_dir().join(format!("alignprop-single-file-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let zeros = [0u8; 4];
    for (name, other, hint) in [
        (
            "sdxl.safetensors",
            "conditioner.embedders.0.transformer.x",
            "SDXL",
        ),
        (
            "no_text.safetensors",
            "cond_stage_model.something.else",
            "cond_stage_model.model.token_embedding.weight",
        ),
    ] {
        let path = dir.join(name);
        let view = || {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &zeros).unwrap()
        };
        let tensors = [
            ("model.diffusion_model.input_blocks.0.0.weight", view()),
            (other, view()),
        ];
        safetensors::serialize_to_file(tensors, None, &path).unwrap();
        let msg = SingleFileCheckpoint::open(&path).unwrap_err().to_string();
        eprintln!("{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(
            msg.contains(
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
            ),
            "{msg}"
        );
        assert!(msg.contains(hint), "'{hint}' in: {msg}");
    }
    // An SD2.x tower with a single block (SD2 uses all but the last): named, with what was expected.
    let path = dir.join("sd2_one_block.safetensors");
    let view =
        || safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &zeros).unwrap();
    let tensors = [
        ("model.diffusion_model.input_blocks.0.0.weight", view()),
        ("cond_stage_model.model.token_embedding.weight", view()),
        (
            "cond_stage_model.model.transformer.resblocks.0.ln_1.weight",
            view(),
        ),
    ];
    safetensors::serialize_to_file(tensors, None, &path).unwrap();
    let msg = SingleFileCheckpoint::open(&path).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(
        msg.contains("has 1 blocks") && msg.contains("expected at least 2"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    let missing = tiny_sd().join("single_file/does-not-exist.safetensors");
    let err = SingleFileCheckpoint::open(&missing).unwrap_err();
    assert!(matches!(err, WeightError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("does-not-exist.safetensors"));
    let not_safetensors = tiny_sd().join("unet/config.json");
    let err = SingleFileCheckpoint::open(&not_safetensors).unwrap_err();
    assert!(matches!(err, WeightError::Format { .. }), "{err:?}");
}

// ------------------------------------------------------------------------------------------------ SD2.x

fn sd2_file() -> PathBuf {
    alignprop_testing::tiny_sd2().join("single_file/tiny-sd21.safetensors")
}

/// The SD2 file (`tiny-sd2/single_file/tiny-sd21.safetensors`: OpenCLIP text tower with one block more than the
/// diffusers text encoder) against the tiny SD2 diffusers files: every UNet and VAE tensor under its original name,
/// every text-encoder tensor under its OpenCLIP name (q, k, v the thirds of the fused in_proj), all with identical
/// bytes; every tensor of the file is reached but the unused ones (the last block, text_projection, logit_scale,
/// the DDPM buffers).
#[test]
fn sd2_single_file_holds_the_diffusers_tensors() {
    use alignprop_io::single_file::{OPEN_CLIP_PREFIX, SdVersion, open_clip_key};
    let sd2 = alignprop_testing::tiny_sd2();
    let ckpt = SingleFileCheckpoint::open(sd2_file()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ckpt.version(), SdVersion::Sd2);
    let up: Vec<String> = {
        let text = std::fs::read_to_string(sd2.join("unet/config.json")).unwrap();
        let cfg: Value = serde_json::from_str(&text).unwrap();
        assert!(cfg["use_linear_projection"].as_bool().unwrap());
        cfg["up_block_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    let layout = SingleFileUnetLayout::from_block_types(2, &up);
    assert_eq!(ckpt.unet_info().layout, layout);
    assert!(ckpt.unet_info().use_linear_projection);
    assert_eq!(ckpt.unet_info().block_out_channels, [8, 16, 24]);
    assert_eq!(ckpt.unet_info().cross_attention_dim, Some(16));
    assert_eq!(
        ckpt.text_encoder_info(),
        &InferredTextEncoder {
            vocab_size: 49408,
            hidden_size: 16,
            intermediate_size: 64,
            num_hidden_layers: 2,
            max_position_embeddings: 77,
        }
    );
    let n_up = ckpt.vae_info().num_up_blocks;
    let none = |_: &str| false;
    let mut reached = check_component(
        "sd2 unet",
        &sd2.join("unet/diffusion_pytorch_model.safetensors"),
        &ckpt.unet(),
        &|k| unet_key(&layout, k),
        &none,
    );
    reached.extend(check_component(
        "sd2 vae",
        &sd2.join("vae/diffusion_pytorch_model.safetensors"),
        &ckpt.vae(),
        &|k| vae_key(n_up, k),
        &none,
    ));

    // The text encoder: 36 tensors (position_ids aside), q/k/v cut from the fused projections.
    let te = open(&sd2.join("text_encoder/model.safetensors"));
    let source = ckpt.text_encoder();
    let mut n_split = 0;
    for key in te.keys() {
        if key.ends_with("position_ids") {
            continue;
        }
        let expected = te.find(&key).unwrap().unwrap();
        let found = source
            .find(&key)
            .unwrap()
            .unwrap_or_else(|| panic!("text encoder '{key}' not in the single file"));
        let mapped = open_clip_key(2, &key);
        assert_eq!(source.stored_key(&key), mapped.stored, "{key}");
        assert!(mapped.stored.starts_with(OPEN_CLIP_PREFIX));
        assert_eq!(found.shape, expected.shape, "{key}");
        assert!(
            found.data.as_bytes() == expected.data.as_bytes(),
            "bytes of '{key}' differ from '{}'",
            found.stored_key
        );
        n_split += usize::from(mapped.part.is_some());
        reached.insert(mapped.stored);
    }
    assert_eq!(n_split, 2 * 6, "q/k/v weight and bias of 2 layers");
    // The block SD2 does not use is not a text-encoder layer.
    let beyond = "text_model.encoder.layers.2.layer_norm1.weight";
    assert!(source.find(beyond).unwrap().is_none());
    let all: BTreeSet<String> = ckpt.source().keys().into_iter().collect();
    let left: Vec<&String> = all.difference(&reached).collect();
    for k in &left {
        assert!(
            ckpt.is_ignorable(k),
            "tensor '{k}' is reached by no mapping"
        );
    }
    let tower_left = left
        .iter()
        .filter(|k| k.starts_with(OPEN_CLIP_PREFIX))
        .count();
    // The last block's 12 tensors, text_projection, logit_scale.
    assert_eq!(tower_left, 12 + 2, "{left:?}");
    assert!(ckpt.unknown_keys().is_empty(), "{:?}", ckpt.unknown_keys());
    eprintln!(
        "sd2 single file: {} tensors, {} reached, {} left (ignorable)",
        all.len(),
        reached.len(),
        left.len()
    );
}

/// A fused projection whose rows are not three equal parts is one clear error naming the file and the key.
#[test]
fn sd2_bad_fused_projection_is_named() {
    use alignprop_io::single_file::{QkvPart, split_qkv};
    let src = open(&sd2_file());
    let key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight";
    let raw = src.find(key).unwrap().unwrap();
    let v = split_qkv(raw.clone(), QkvPart::V).unwrap();
    assert_eq!(v.shape, [16, 16]);
    assert!(
        v.stored_key.contains("rows 32..48, the v part"),
        "{}",
        v.stored_key
    );
    let mut bad = raw;
    bad.shape = vec![47, 16];
    let Err(err) = split_qkv(bad, QkvPart::Q) else {
        panic!("47 rows split into q, k, v");
    };
    let msg = err.to_string();
    eprintln!("{msg}");
    for part in ["tiny-sd21.safetensors", key, "[3 x width, ...]", "[47, 16]"] {
        assert!(msg.contains(part), "'{part}' missing from: {msg}");
    }
}
