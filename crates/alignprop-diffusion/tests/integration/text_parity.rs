//! Parity of the CLIP tokenizer and text encoder with transformers, on the tiny-sd fixtures
//! (`refs/tokenizer.json`, `refs/tokenizer.safetensors`, `refs/text_encoder.safetensors`).

use crate::common;

use std::path::PathBuf;

use alignprop_diffusion::clip::{CLIPActivation, CLIPTextConfig, CLIPTextModel};
use alignprop_diffusion::tokenizer::{CLIPTokenizer, TokenizerError};
use alignprop_io::pipeline_files::read_json;
use alignprop_io::weights::{TensorSource, VarBuilder, WeightError};
use burn::tensor::{DType, Int, Tensor, TensorData};
use common::{B, assert_close, ref_int, ref_tensor, refs, rel_err, tiny_sd};

/// One prompt of `refs/tokenizer.json`.
#[derive(serde::Deserialize)]
struct PromptRef {
    prompt: String,
    ids: Vec<u32>,
    padded_77: Vec<u32>,
    truncated: bool,
}

#[derive(serde::Deserialize)]
struct TokenizerRefs {
    prompts: Vec<PromptRef>,
}

fn prompt_refs() -> Vec<PromptRef> {
    let refs: TokenizerRefs = read_json(&tiny_sd().join("refs/tokenizer.json")).unwrap();
    assert_eq!(refs.prompts.len(), 15);
    refs.prompts
}

fn tokenizer_dir() -> PathBuf {
    tiny_sd().join("tokenizer")
}

fn check_tokenizer(tok: &CLIPTokenizer, what: &str) {
    let rows = prompt_refs();
    let expected_rows = ref_int::<2>(&refs("tokenizer.safetensors"), "input_ids");
    for p in &rows {
        assert_eq!(
            tok.tokenize(&p.prompt).unwrap(),
            p.ids,
            "{what}: ids of {:?}",
            p.prompt
        );
        let padded = tok.encode(&p.prompt).unwrap();
        assert_eq!(padded, p.padded_77, "{what}: padded ids of {:?}", p.prompt);
        assert_eq!(p.truncated, p.ids.len() > 77);
    }
    let prompts: Vec<&str> = rows.iter().map(|p| p.prompt.as_str()).collect();
    let ids: Tensor<B, 2, Int> = tok.input_ids(&prompts, &Default::default()).unwrap();
    assert_eq!(ids.dims(), [15, 77]);
    assert_eq!(
        ids.into_data().convert::<i64>().to_vec::<i64>().unwrap(),
        expected_rows
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap(),
        "{what}: input_ids tensor vs refs/tokenizer.safetensors"
    );
    eprintln!("{what}: 15/15 prompts identical (ids and padded_77)");
}

#[test]
fn tokenizer_json_matches_transformers() {
    let tok = CLIPTokenizer::from_file(tokenizer_dir().join("tokenizer.json")).unwrap();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.vocab_size()),
        (49406, 49407, 49407, 49408)
    );
    check_tokenizer(&tok, "tokenizer.json");
    assert_eq!(
        tok.decode(&tok.encode("a photo of a cat").unwrap())
            .unwrap(),
        "a photo of a cat"
    );
}

#[test]
fn vocab_and_merges_match_transformers() {
    let dir = tokenizer_dir();
    let tok =
        CLIPTokenizer::from_vocab_merges(dir.join("vocab.json"), dir.join("merges.txt")).unwrap();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.vocab_size()),
        (49406, 49407, 49407, 49408)
    );
    check_tokenizer(&tok, "vocab.json + merges.txt");
}

#[test]
fn bundled_sd15_tokenizer_matches_transformers() {
    let tok = CLIPTokenizer::sd15();
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.vocab_size()),
        (49406, 49407, 49407, 49408)
    );
    check_tokenizer(&tok, "CLIPTokenizer::sd15 (bundled)");
    // The bundled files are the fixture's (SD1.5's) tokenizer files, byte for byte.
    for (name, bytes) in alignprop_diffusion::tokenizer::SD15_TOKENIZER_FILES {
        let fixture = std::fs::read(tokenizer_dir().join(name)).unwrap();
        assert!(
            fixture == bytes,
            "bundled {name} differs from the fixture's"
        );
    }
}

#[test]
fn vocab_and_merges_from_bytes() {
    let dir = tokenizer_dir();
    let (vocab, merges) = (
        std::fs::read(dir.join("vocab.json")).unwrap(),
        std::fs::read(dir.join("merges.txt")).unwrap(),
    );
    let tok = CLIPTokenizer::from_vocab_merges_bytes(&vocab, &merges).unwrap();
    check_tokenizer(&tok, "vocab + merges bytes");
    let err = CLIPTokenizer::from_vocab_merges_bytes(b"{not json", &merges).unwrap_err();
    assert!(err.to_string().contains("vocab.json"), "{err}");
    let err =
        CLIPTokenizer::from_vocab_merges_bytes(&vocab, b"#version: 0.2\ni n\nthree symbols here\n")
            .unwrap_err();
    assert!(
        err.to_string().contains("merges.txt") && err.to_string().contains("line 3"),
        "{err}"
    );
    let err = CLIPTokenizer::from_vocab_merges_bytes(&[0xff, 0xfe], &merges).unwrap_err();
    assert!(err.to_string().contains("UTF-8"), "{err}");
}

#[test]
fn tokenizer_from_folder_picks_available_files() {
    // The fixture folder has tokenizer.json.
    check_tokenizer(
        &CLIPTokenizer::from_folder(tokenizer_dir()).unwrap(),
        "from_folder (tokenizer.json)",
    );
    // A folder with only SD1.5's slow-tokenizer files.
    let dir = common::scratch("text_parity", "slow_tokenizer");
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(tokenizer_dir().join(f), dir.join(f)).unwrap();
    }
    check_tokenizer(
        &CLIPTokenizer::from_folder(&dir).unwrap(),
        "from_folder (vocab + merges)",
    );
    // Nothing there.
    let empty = common::scratch("text_parity", "no_tokenizer");
    let err = CLIPTokenizer::from_folder(&empty).unwrap_err();
    assert!(matches!(err, TokenizerError::NotFound { .. }));
    assert!(err.to_string().contains("no_tokenizer"), "{err}");
}

#[test]
fn tokenizer_errors_name_the_file() {
    let dir = common::scratch("text_parity", "bad_tokenizer");
    let missing = dir.join("vocab.json");
    let err =
        CLIPTokenizer::from_vocab_merges(&missing, tokenizer_dir().join("merges.txt")).unwrap_err();
    eprintln!("{err}");
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let merges = dir.join("merges.txt");
    std::fs::write(&merges, "#version: 0.2\ni n\nthree symbols here\n").unwrap();
    let err =
        CLIPTokenizer::from_vocab_merges(tokenizer_dir().join("vocab.json"), &merges).unwrap_err();
    eprintln!("{err}");
    assert!(
        err.to_string().contains(&merges.display().to_string())
            && err.to_string().contains("line 3"),
        "{err}"
    );

    let json = dir.join("tokenizer.json");
    std::fs::write(&json, "{not json").unwrap();
    let err = CLIPTokenizer::from_file(&json).unwrap_err();
    eprintln!("{err}");
    assert!(
        err.to_string().contains(&json.display().to_string()),
        "{err}"
    );
}

fn te_dir() -> PathBuf {
    tiny_sd().join("text_encoder")
}

fn tiny_config() -> CLIPTextConfig {
    read_json(&te_dir().join("config.json")).unwrap()
}

/// Checks every text-encoder reference in `dtype` (f32: plain refs; f64: `last_hidden_state_f64`).
fn check_against_refs(model: &CLIPTextModel<B>, dtype: DType, what: &str) {
    let r = refs("text_encoder.safetensors");
    let out = model.forward_hidden_states(ref_int(&r, "input_ids"));
    let (lhs_key, tol) = match dtype {
        DType::F64 => ("last_hidden_state_f64", 1e-6),
        _ => ("last_hidden_state", 1e-4),
    };
    assert_close(
        &format!("{what} {lhs_key}"),
        out.last_hidden_state,
        ref_tensor(&r, lhs_key, dtype),
        tol,
    );
    assert_close(
        &format!("{what} pooler_output"),
        out.pooler_output,
        ref_tensor(&r, "pooler_output", dtype),
        1e-4,
    );
    let hidden = out.hidden_states.expect("hidden states requested");
    assert_eq!(hidden.len(), 3);
    for (i, h) in hidden.into_iter().enumerate() {
        let key = format!("debug.hidden_states.{i}");
        assert_close(
            &format!("{what} {key}"),
            h,
            ref_tensor(&r, &key, dtype),
            1e-4,
        );
    }
}

#[test]
fn text_encoder_f32_matches_transformers() {
    let model = CLIPTextModel::<B>::load(&te_dir(), &Default::default(), DType::F32).unwrap();
    check_against_refs(&model, DType::F32, "f32");
}

#[test]
fn text_encoder_f64_matches_transformers() {
    let model = CLIPTextModel::<B>::load(&te_dir(), &Default::default(), DType::F64).unwrap();
    let r = refs("text_encoder.safetensors");
    let out = model.forward(ref_int(&r, "input_ids"));
    assert!(out.hidden_states.is_none());
    assert_close(
        "f64 last_hidden_state_f64",
        out.last_hidden_state.clone(),
        ref_tensor(&r, "last_hidden_state_f64", DType::F64),
        1e-6,
    );
    // The f32 references, for scale: the f64 model against float32 PyTorch.
    let (rel, _) = rel_err(
        out.last_hidden_state,
        ref_tensor(&r, "last_hidden_state", DType::F64),
    );
    eprintln!("f64 model vs f32 last_hidden_state: rel L2 err {rel:.3e}");
    assert_close(
        "f64 pooler_output (vs f32 ref)",
        out.pooler_output,
        ref_tensor(&r, "pooler_output", DType::F64),
        1e-4,
    );
}

/// The model is generic over the backend: it also runs under `Autodiff` (frozen parameters, as in training).
#[test]
fn text_encoder_runs_under_autodiff() {
    type AD = alignprop_device::CpuAutodiff;
    let model = CLIPTextModel::<AD>::load(&te_dir(), &Default::default(), DType::F32).unwrap();
    let r = refs("text_encoder.safetensors");
    let ids = Tensor::<AD, 2, Int>::from_inner(ref_int(&r, "input_ids"));
    let out = model.forward(ids).last_hidden_state.inner();
    assert_close(
        "autodiff last_hidden_state",
        out,
        ref_tensor(&r, "last_hidden_state", DType::F32),
        1e-4,
    );
}

#[test]
fn tokenizer_gives_the_text_encoder_reference_ids() {
    let tok = CLIPTokenizer::from_folder(tokenizer_dir()).unwrap();
    let ids: Tensor<B, 2, Int> = tok
        .input_ids(&["", "a photo of a cat"], &Default::default())
        .unwrap();
    let expected = ref_int::<2>(&refs("text_encoder.safetensors"), "input_ids");
    assert_eq!(
        ids.into_data().convert::<i64>().to_vec::<i64>().unwrap(),
        expected
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .unwrap()
    );
}

#[test]
fn config_defaults_and_sd15_style_config() {
    let d = CLIPTextConfig::default();
    assert_eq!(
        (
            d.vocab_size,
            d.hidden_size,
            d.intermediate_size,
            d.num_hidden_layers,
            d.num_attention_heads
        ),
        (49408, 768, 3072, 12, 12)
    );
    assert_eq!(
        (d.max_position_embeddings, d.hidden_act, d.layer_norm_eps),
        (77, CLIPActivation::QuickGelu, 1e-5)
    );
    let empty: CLIPTextConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(empty.encoder_dims(), d.encoder_dims());

    let new = tiny_config();
    let old: CLIPTextConfig =
        read_json(&tiny_sd().join("extra/sd15_style_configs/text_encoder_config.json")).unwrap();
    assert_eq!(new.encoder_dims(), old.encoder_dims());
    assert_eq!(
        (new.vocab_size, new.max_position_embeddings),
        (old.vocab_size, old.max_position_embeddings)
    );
    assert_eq!((new.bos_token_id, new.eos_token_id), (49406, 49407));
    assert_eq!((old.bos_token_id, old.eos_token_id), (0, 2));

    // The legacy config (eos 2: pooled row = argmax of the ids) builds the same model with the same outputs.
    let files = [te_dir().join("model.safetensors")];
    let vb = VarBuilder::<B>::from_safetensors(&files, &Default::default(), DType::F32).unwrap();
    let legacy = CLIPTextModel::new(&old, &vb).unwrap();
    check_against_refs(&legacy, DType::F32, "sd15-style config");

    let gelu: CLIPTextConfig = serde_json::from_str(r#"{"hidden_act": "gelu"}"#).unwrap();
    assert_eq!(gelu.hidden_act, CLIPActivation::Gelu);
    assert!(serde_json::from_str::<CLIPTextConfig>(r#"{"hidden_act": "relu6"}"#).is_err());
}

/// The pooled row for ids without the end-of-text token: the first `eos_token_id` (none here: position 0, as
/// torch's argmax of all zeros) or, legacy, the first position of the largest id.
#[test]
fn pooling_follows_eos_token_id() {
    let files = [te_dir().join("model.safetensors")];
    let vb = VarBuilder::<B>::from_safetensors(&files, &Default::default(), DType::F32).unwrap();
    let old: CLIPTextConfig =
        read_json(&tiny_sd().join("extra/sd15_style_configs/text_encoder_config.json")).unwrap();
    let new_model = CLIPTextModel::new(&tiny_config(), &vb).unwrap();
    let legacy_model = CLIPTextModel::new(&old, &vb).unwrap();
    // Row 0: no 49407, largest id 2368 at positions 2 and 4. Row 1: 49407 at 2 and 4.
    let rows: [[i64; 7]; 2] = [
        [320, 1125, 2368, 320, 2368, 539, 1],
        [49406, 320, 49407, 539, 49407, 1, 1],
    ];
    let ids =
        Tensor::<B, 2, Int>::from_data(TensorData::new(rows.concat(), [2, 7]), &Default::default());
    for (model, expected, what) in [
        (&new_model, [0, 2], "eos 49407"),
        (&legacy_model, [2, 2], "legacy eos 2"),
    ] {
        let out = model.forward(ids.clone());
        for (b, &pos) in expected.iter().enumerate() {
            let row = out
                .last_hidden_state
                .clone()
                .slice([b..b + 1, pos..pos + 1])
                .reshape([32]);
            let pooled = out.pooler_output.clone().slice(b..b + 1).reshape([32]);
            let (rel, _) = rel_err(pooled, row);
            assert_eq!(rel, 0.0, "{what}: row {b} should pool position {pos}");
        }
    }
}

#[test]
fn clip_skip_uses_earlier_layers() {
    let model = CLIPTextModel::<B>::load(&te_dir(), &Default::default(), DType::F32).unwrap();
    let ids = ref_int::<2>(&refs("text_encoder.safetensors"), "input_ids");
    let out = model.forward_hidden_states(ids.clone());
    let (rel, _) = rel_err(
        model.encode_clip_skip(ids.clone(), 0),
        out.last_hidden_state,
    );
    assert_eq!(rel, 0.0, "clip_skip 0 is last_hidden_state");
    let penultimate = model
        .final_layer_norm
        .forward(out.hidden_states.unwrap()[1].clone());
    let (rel, _) = rel_err(model.encode_clip_skip(ids, 1), penultimate);
    assert_eq!(
        rel, 0.0,
        "clip_skip 1 is final_layer_norm(hidden_states[-2])"
    );
}

/// transformers >= 5 saves `CLIPTextModel` keys without `text_model.` and without `position_ids`.
#[test]
fn loads_keys_without_text_model_prefix() {
    let src_path = te_dir().join("model.safetensors");
    let bytes = std::fs::read(&src_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .iter()
        .filter(|(k, _)| !k.ends_with("position_ids"))
        .map(|(k, v)| {
            (
                k.strip_prefix("text_model.")
                    .expect("fixture keys are prefixed")
                    .to_string(),
                v,
            )
        })
        .collect();
    assert_eq!(renamed.len(), 36);
    let dir = common::scratch("text_parity", "unprefixed_text_encoder");
    safetensors::serialize_to_file(renamed, None, &dir.join("model.safetensors")).unwrap();
    std::fs::copy(te_dir().join("config.json"), dir.join("config.json")).unwrap();

    let model = CLIPTextModel::<B>::load(&dir, &Default::default(), DType::F32).unwrap();
    check_against_refs(&model, DType::F32, "unprefixed file");
    let reference = CLIPTextModel::<B>::load(&te_dir(), &Default::default(), DType::F32).unwrap();
    let ids = ref_int::<2>(&refs("text_encoder.safetensors"), "input_ids");
    let (rel, _) = rel_err(
        model.forward(ids.clone()).last_hidden_state,
        reference.forward(ids).last_hidden_state,
    );
    assert_eq!(rel, 0.0, "same tensors, same output");
}

#[test]
fn shape_mismatch_error_names_key_and_shapes() {
    let files = [te_dir().join("model.safetensors")];
    let vb = VarBuilder::<B>::from_safetensors(&files, &Default::default(), DType::F32).unwrap();
    let cfg = CLIPTextConfig {
        intermediate_size: 64,
        ..tiny_config()
    };
    let err = CLIPTextModel::new(&cfg, &vb).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, WeightError::Shape { .. }));
    for part in [
        "text_model.encoder.layers.0.mlp.fc1.weight",
        "[64, 32]",
        "[128, 32]",
        "model.safetensors",
    ] {
        assert!(msg.contains(part), "'{part}' missing from: {msg}");
    }
    // A config with more layers than the file: the missing key is named.
    let cfg = CLIPTextConfig {
        num_hidden_layers: 3,
        ..tiny_config()
    };
    let msg = CLIPTextModel::new(&cfg, &vb).unwrap_err().to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("text_model.encoder.layers.2.layer_norm1.weight"),
        "{msg}"
    );
    // Heads that do not divide the width.
    let cfg = CLIPTextConfig {
        num_attention_heads: 5,
        ..tiny_config()
    };
    let msg = CLIPTextModel::new(&cfg, &vb).unwrap_err().to_string();
    assert!(msg.contains("num_attention_heads 5"), "{msg}");
    // `position_ids` (I64) is in the file but never requested.
    let src = alignprop_io::weights::SafetensorsSource::open(&files).unwrap();
    assert!(src.keys().iter().any(|k| k.ends_with("position_ids")));
    assert!(!vb.used_keys().iter().any(|k| k.ends_with("position_ids")));
}

/// The full-size SD1.5 text encoder (123 M parameters, random weights): one forward pass of batch 2.
#[test]
#[ignore = "full-size model: ~0.5 GB of random weights"]
fn full_size_sd15_text_encoder_random_weights() {
    use burn::tensor::backend::Backend;
    let device = Default::default();
    B::seed(&device, 0);
    let cfg = CLIPTextConfig::default();
    let t0 = std::time::Instant::now();
    let model = CLIPTextModel::<B>::new(&cfg, &VarBuilder::random(&device, DType::F32)).unwrap();
    eprintln!("built in {:.2?}", t0.elapsed());
    let tok = CLIPTokenizer::from_folder(tokenizer_dir()).unwrap();
    let ids: Tensor<B, 2, Int> = tok.input_ids(&["", "a photo of a cat"], &device).unwrap();
    let t0 = std::time::Instant::now();
    let out = model.forward(ids);
    let hidden: Vec<f32> = out
        .last_hidden_state
        .clone()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    let elapsed = t0.elapsed();
    eprintln!("SD1.5 text encoder forward, batch 2 x 77 tokens: {elapsed:.2?}");
    assert_eq!(out.last_hidden_state.dims(), [2, 77, 768]);
    assert_eq!(out.pooler_output.dims(), [2, 768]);
    assert!(hidden.iter().all(|x| x.is_finite()));
    let pooled: Vec<f32> = out
        .pooler_output
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    assert!(pooled.iter().all(|x| x.is_finite()));
}
