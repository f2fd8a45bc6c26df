//! HPSv2 (open_clip CLIP) and PickScore (transformers CLIPModel) against open_clip / transformers / torch
//! (`tests/fixtures/tiny-prompt-reward`, made by `xtask/fixtures/make_prompt_reward_refs.py`): token ids, features,
//! the 2 images x 2 prompts score matrix and the gradient of the scores with respect to the images, in f32 and f64.
//!
//! The fixture stores its 49408-row token embeddings compactly; the tests load the models from the standard files
//! [`write_prompt_reward_models`] writes, through the library's own loaders.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use alignprop_io::VarBuilder;
use alignprop_io::weights::{SafetensorsSource, TensorSource};
use alignprop_rewards::Reward;
use alignprop_rewards::hps::HpsScorer;
use alignprop_rewards::open_clip::{OpenClipConfig, open_weights};
use alignprop_rewards::pickscore::{CLIPConfig, PickScorer};
use alignprop_rewards::preprocess::{CLIP_MEAN, CLIP_STD, clip_preprocess_center_crop};
use alignprop_rewards::text::{load_tokenizer, prompt_ids};
use alignprop_testing::prompt_reward::{
    PromptRewardModels, tiny_prompt_reward, write_prompt_reward_models,
};
use alignprop_testing::{ref_int_on, ref_tensor_on, ref_values, rel_err, values};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};

type I = burn::backend::Flex;
type A = Autodiff<I>;

fn dir() -> PathBuf {
    tiny_prompt_reward()
}

fn refs() -> SafetensorsSource {
    SafetensorsSource::open(&[dir().join("refs.safetensors")]).unwrap()
}

/// The test prompts (the third, longer than 77 tokens, is only used for the token ids).
fn prompts() -> Vec<String> {
    serde_json::from_str(&refs().metadata()["prompts"]).unwrap()
}

/// The fixture models as standard files in a fresh temporary folder (removed when dropped).
struct Models(PromptRewardModels, PathBuf);

impl Drop for Models {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.1).ok();
    }
}

fn models() -> Models {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "alignprop-prompt-rewards-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    Models(write_prompt_reward_models(&d).unwrap(), d)
}

fn hps<B: Backend>(m: &Models, dtype: DType) -> HpsScorer<B> {
    let m = &m.0;
    HpsScorer::load(
        &m.hps_weights,
        Some(&m.hps_config),
        &m.tokenizer,
        &Default::default(),
        dtype,
    )
    .unwrap()
}

fn pickscore<B: Backend>(m: &Models, dtype: DType) -> PickScorer<B> {
    let m = &m.0;
    PickScorer::load(&m.pickscore, None, &m.tokenizer, &Default::default(), dtype).unwrap()
}

fn tokenizer() -> alignprop_diffusion::tokenizer::CLIPTokenizer {
    load_tokenizer(&alignprop_testing::tiny_sd().join("tokenizer")).unwrap()
}

/// `[2, 2]` reference matrix (image, prompt) -> the diagonal and the anti-diagonal `[m01, m10]`.
fn diag_and_swapped(m: &[f64]) -> (Vec<f64>, Vec<f64>) {
    (vec![m[0], m[3]], vec![m[1], m[2]])
}

fn err(a: &[f64], e: &[f64]) -> f64 {
    alignprop_testing::rel_err_values(a, e).0
}

#[test]
fn token_ids_match_open_clip_and_transformers_tokenizers() {
    let d = Default::default();
    let r = refs();
    let tok = tokenizer();
    let p = prompts();
    assert_eq!(p.len(), 3);
    let oc: Tensor<I, 2, Int> = prompt_ids(&tok, &p, 77, 0, &d).unwrap();
    let hf: Tensor<I, 2, Int> = prompt_ids(&tok, &p, 77, tok.pad_id(), &d).unwrap();
    let want_oc: Tensor<I, 2, Int> = ref_int_on(&r, "ids_open_clip", &d);
    let want_hf: Tensor<I, 2, Int> = ref_int_on(&r, "ids_hf", &d);
    assert_eq!(
        oc.into_data(),
        want_oc.into_data(),
        "open_clip.tokenize ids"
    );
    assert_eq!(hf.into_data(), want_hf.into_data(), "CLIPTokenizer ids");
    // The scorers pad as their reference libraries: open_clip with 0, the PickScore processor with its pad token.
    let m = models();
    let h = hps::<I>(&m, DType::F32);
    let ids = h.input_ids(&p[..2], &d).unwrap();
    assert_eq!(
        ids.into_data(),
        ref_int_on::<I, 2>(&r, "ids_open_clip", &d)
            .slice(0..2)
            .into_data()
    );
    let ps = pickscore::<I>(&m, DType::F32);
    let ids = ps.input_ids(&p[..2], &d).unwrap();
    assert_eq!(
        ids.into_data(),
        ref_int_on::<I, 2>(&r, "ids_hf", &d).slice(0..2).into_data()
    );
}

#[test]
fn hps_scores_and_image_gradients_match_open_clip() {
    let r = refs();
    let d = Default::default();
    let p = prompts()[..2].to_vec();
    let swapped = vec![p[1].clone(), p[0].clone()];
    let m = models();
    for (dtype, sfx, tol) in [(DType::F32, "", 1e-4), (DType::F64, "_f64", 1e-9)] {
        let scorer = hps::<A>(&m, dtype);
        let image: Tensor<A, 4> = ref_tensor_on(&r, "image", &d, dtype);
        let image = image.require_grad();
        let px = clip_preprocess_center_crop(image.clone(), 16, CLIP_MEAN, CLIP_STD);
        let (e_px, _) = rel_err(
            px.clone().inner(),
            ref_tensor_on(&r, &format!("pixel_values{sfx}"), &d, dtype),
        );
        let (e_fi, _) = rel_err(
            scorer.clip.encode_image(px).inner(),
            ref_tensor_on(&r, &format!("hps_image_features{sfx}"), &d, dtype),
        );
        let (e_ft, _) = rel_err(
            scorer
                .clip
                .encode_text(scorer.input_ids(&p, &d).unwrap())
                .inner(),
            ref_tensor_on(&r, &format!("hps_text_features{sfx}"), &d, dtype),
        );
        let (want, want_swapped) = diag_and_swapped(&ref_values(&r, &format!("hps_scores{sfx}")));
        let s_sw = scorer.score_with_prompts(image.clone(), &swapped).unwrap();
        let e_sw = err(&values(s_sw.inner()), &want_swapped);
        let s = scorer.score_with_prompts(image.clone(), &p).unwrap();
        let e_s = err(&values(s.clone().inner()), &want);
        let g = image.grad(&s.sum().backward()).unwrap();
        let (e_g, _) = rel_err(
            g,
            ref_tensor_on(&r, &format!("hps_grad_image{sfx}"), &d, dtype),
        );
        eprintln!(
            "HPS {dtype:?}: pixel_values {e_px:.2e}, image features {e_fi:.2e}, text features {e_ft:.2e}, \
             scores {e_s:.2e} / swapped prompts {e_sw:.2e}, d score/d image {e_g:.2e}"
        );
        for (what, e) in [
            ("pixel_values", e_px),
            ("image features", e_fi),
            ("text features", e_ft),
        ] {
            assert!(e < tol, "{dtype:?} {what}: {e:e}");
        }
        for (what, e) in [("scores", e_s), ("swapped", e_sw), ("gradient", e_g)] {
            assert!(e < tol.max(1e-4), "{dtype:?} {what}: {e:e}");
        }
    }
}

/// HPSv2's release format: a torch file with the state dict under `state_dict`, DDP's `module.` prefix, float16.
/// Every tensor read through [`open_weights`] equals the float32 safetensors one (the weights are float16 values),
/// and so does every tensor of its `alignprop convert pth` conversion (prefixes kept, found again when loading).
#[test]
fn hps_torch_checkpoint_with_state_dict_and_module_prefix_loads() {
    let pt_path = dir().join("hps/HPS_tiny.pt");
    let converted = std::env::temp_dir().join(format!(
        "alignprop-hps-converted-{}.safetensors",
        std::process::id()
    ));
    alignprop_io::pth::pth_to_safetensors(&pt_path, &converted).unwrap();
    let pt = open_weights(&pt_path).unwrap();
    let conv = open_weights(&converted).unwrap();
    let st = open_weights(&dir().join("hps/model.safetensors")).unwrap();
    let keys = st.keys();
    assert!(keys.len() > 40 && keys.contains(&"visual.conv1.weight".to_string()));
    for k in keys {
        let b = st.find(&k).unwrap().unwrap();
        for src in [&pt, &conv] {
            let a = src.find(&k).unwrap().unwrap();
            assert_eq!(a.shape, b.shape, "{k}");
            assert_eq!(a.stored_key, format!("state_dict.module.{k}"));
            let (a, b): (Vec<f64>, Vec<f64>) = (
                a.data.convert::<f64>().to_vec().unwrap(),
                b.data.clone().convert::<f64>().to_vec().unwrap(),
            );
            assert_eq!(a, b, "{k}");
        }
    }
    std::fs::remove_file(&converted).ok();
}

#[test]
fn pickscore_scores_and_image_gradients_match_transformers() {
    let r = refs();
    let d = Default::default();
    let p = prompts()[..2].to_vec();
    let swapped = vec![p[1].clone(), p[0].clone()];
    let m = models();
    for (dtype, sfx, tol) in [(DType::F32, "", 1e-4), (DType::F64, "_f64", 1e-9)] {
        let scorer = pickscore::<A>(&m, dtype);
        let image: Tensor<A, 4> = ref_tensor_on(&r, "image", &d, dtype);
        let image = image.require_grad();
        let px = clip_preprocess_center_crop(image.clone(), 16, CLIP_MEAN, CLIP_STD);
        let (e_ie, _) = rel_err(
            scorer.vision.forward(px).inner(),
            ref_tensor_on(&r, &format!("pick_image_embeds{sfx}"), &d, dtype),
        );
        let te = scorer.text_projection.forward(
            scorer
                .text
                .forward(scorer.input_ids(&p, &d).unwrap())
                .pooler_output,
        );
        let (e_te, _) = rel_err(
            te.inner(),
            ref_tensor_on(&r, &format!("pick_text_embeds{sfx}"), &d, dtype),
        );
        let (want, want_swapped) = diag_and_swapped(&ref_values(&r, &format!("pick_scores{sfx}")));
        let e_sw = err(
            &values(
                scorer
                    .score_with_prompts(image.clone(), &swapped)
                    .unwrap()
                    .inner(),
            ),
            &want_swapped,
        );
        let s = scorer.score_with_prompts(image.clone(), &p).unwrap();
        let e_s = err(&values(s.clone().inner()), &want);
        let g = image.grad(&s.sum().backward()).unwrap();
        let (e_g, _) = rel_err(
            g,
            ref_tensor_on(&r, &format!("pick_grad_image{sfx}"), &d, dtype),
        );
        eprintln!(
            "PickScore {dtype:?}: image embeds {e_ie:.2e}, text embeds {e_te:.2e}, scores {e_s:.2e} / swapped \
             prompts {e_sw:.2e}, d score/d image {e_g:.2e}"
        );
        for (what, e) in [("image embeds", e_ie), ("text embeds", e_te)] {
            assert!(e < tol, "{dtype:?} {what}: {e:e}");
        }
        for (what, e) in [("scores", e_s), ("swapped", e_sw), ("gradient", e_g)] {
            assert!(e < tol.max(1e-4), "{dtype:?} {what}: {e:e}");
        }
    }
}

#[test]
fn losses_are_one_minus_score_for_hps_and_minus_score_for_pickscore() {
    let d = Default::default();
    let s = || Tensor::<I, 1>::from_floats([0.25, -0.5], &d);
    let m = models();
    let h = hps::<I>(&m, DType::F32);
    assert_eq!(values(h.loss(s())), [0.75, 1.5]);
    assert_eq!(Reward::<I>::name(&h), "hps");
    let p = pickscore::<I>(&m, DType::F32);
    assert_eq!(values(p.loss(s())), [-0.25, 0.5]);
    assert_eq!(Reward::<I>::name(&p), "pickscore");
}

#[test]
fn loading_errors_name_the_file_and_the_problem() {
    // A transformers CLIPModel file is not an open_clip state dict.
    let pick = dir().join("pickscore/model.safetensors");
    let e = open_weights(&pick).err().unwrap().to_string();
    assert!(
        e.contains("visual.conv1.weight") && e.contains("model.safetensors"),
        "{e}"
    );
    // Architecture options that are not implemented are refused by name.
    let cfg_path = std::env::temp_dir().join(format!("alignprop-oc-{}.json", std::process::id()));
    std::fs::write(
        &cfg_path,
        r#"{"embed_dim": 16, "vision_cfg": {"ls_init_value": 0.1}}"#,
    )
    .unwrap();
    let e = OpenClipConfig::from_file(&cfg_path)
        .unwrap_err()
        .to_string();
    std::fs::remove_file(&cfg_path).ok();
    assert!(
        e.contains("vision_cfg.ls_init_value") && e.contains("alignprop-oc-"),
        "{e}"
    );
    // A wrong config for the weights: the shape error names the key and both shapes.
    let mut cfg = OpenClipConfig::from_file(&dir().join("hps/open_clip_config.json")).unwrap();
    cfg.embed_dim = 8;
    let src = open_weights(&dir().join("hps/model.safetensors")).unwrap();
    let vb = VarBuilder::<I>::from_source(src, &Default::default(), DType::F32);
    let e = HpsScorer::new(&cfg, &vb, tokenizer())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("visual.proj") && e.contains("[32, 8]") && e.contains("[32, 16]"),
        "{e}"
    );
    // A CLIPVisionModel config is not a CLIPModel config.
    let vis_cfg = dir().join("../tiny-reward/clip_vision/config.json");
    let e = CLIPConfig::from_file(&vis_cfg).unwrap_err().to_string();
    assert!(e.contains("not a CLIPModel config"), "{e}");
}

/// The top-level `projection_dim` of a CLIPModel config wins over the towers' own (the tiny fixture's towers say
/// 512, the model 16), and transformers' defaults fill keys a config leaves out.
#[test]
fn clip_model_config_reads_projection_and_defaults() {
    let cfg = CLIPConfig::from_file(&dir().join("pickscore/config.json")).unwrap();
    assert_eq!(cfg.projection_dim, 16);
    assert_eq!(cfg.vision_config.projection_dim, 16);
    assert_eq!(cfg.text_config.eos_token_id, 2);
    let path = std::env::temp_dir().join(format!("alignprop-clipcfg-{}.json", std::process::id()));
    std::fs::write(
        &path,
        r#"{"projection_dim": 1024, "text_config": {"hidden_size": 1024},
            "text_config_dict": {"num_hidden_layers": 24}, "vision_config": {"patch_size": 14}}"#,
    )
    .unwrap();
    let cfg = CLIPConfig::from_file(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(
        (
            cfg.text_config.hidden_size,
            cfg.text_config.num_hidden_layers,
            cfg.text_config.intermediate_size
        ),
        (1024, 24, 2048)
    );
    assert_eq!(
        (cfg.vision_config.hidden_size, cfg.vision_config.patch_size),
        (768, 14)
    );
}

/// HPSv2's real shapes: open_clip ViT-H-14 (986,109,441 parameters with logit_scale, as open_clip counts them),
/// random weights, one 224x224 forward with a prompt.
/// Run: `cargo test --release -p alignprop-rewards --test integration -- --ignored prompt_reward_parity::real_vit_h14`
/// (about 45 s on 2 CPU cores; the dev profile works too, its dependencies being optimised).
#[test]
#[ignore = "full-size ViT-H/14: ~4 GB of random weights and a slow CPU forward (run in release mode)"]
fn real_vit_h14_hps_config_builds_and_runs() {
    use burn::module::Module;
    let d = Default::default();
    let vb = VarBuilder::<I>::random(&d, DType::F32);
    let scorer = HpsScorer::new(&OpenClipConfig::vit_h_14(), &vb, tokenizer()).unwrap();
    let n = scorer.clip.num_params();
    eprintln!("ViT-H-14 parameters (without logit_scale): {n}");
    assert_eq!(n, 986_109_440);
    let images = Tensor::<I, 4>::random(
        [1, 3, 256, 256],
        burn::tensor::Distribution::Uniform(-1.0, 1.0),
        &d,
    );
    let s = values(
        scorer
            .score_with_prompts(images, &["a painting of a fox".to_string()])
            .unwrap(),
    );
    assert_eq!(s.len(), 1);
    assert!(s[0].is_finite() && s[0].abs() <= 1.0 + 1e-5);
}

/// PickScore's real shapes: CLIP-H/14 as transformers (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's config), random
/// weights, one 224x224 forward with a prompt.
/// Run: `cargo test --release -p alignprop-rewards --test integration -- --ignored prompt_reward_parity::real_clip_h14`
/// (about 45 s on 2 CPU cores; the dev profile works too, its dependencies being optimised).
#[test]
#[ignore = "full-size CLIP-H/14: ~4 GB of random weights and a slow CPU forward (run in release mode)"]
fn real_clip_h14_pickscore_config_builds_and_runs() {
    use burn::module::Module;
    let path = std::env::temp_dir().join(format!("alignprop-cliph-{}.json", std::process::id()));
    std::fs::write(
        &path,
        r#"{"projection_dim": 1024,
            "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                            "num_hidden_layers": 24, "hidden_act": "gelu"},
            "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
                              "num_hidden_layers": 32, "patch_size": 14, "image_size": 224, "hidden_act": "gelu"}}"#,
    )
    .unwrap();
    let cfg = CLIPConfig::from_file(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let d = Default::default();
    let vb = VarBuilder::<I>::random(&d, DType::F32);
    let scorer = PickScorer::new(&cfg, &vb, tokenizer()).unwrap();
    let n = scorer.vision.num_params()
        + scorer.text.num_params()
        + scorer.text_projection.num_params()
        + 1;
    eprintln!("CLIP-H/14 parameters: {n}");
    assert_eq!(n, 986_109_441);
    let images = Tensor::<I, 4>::random(
        [1, 3, 256, 256],
        burn::tensor::Distribution::Uniform(-1.0, 1.0),
        &d,
    );
    let s = values(
        scorer
            .score_with_prompts(images, &["a painting of a fox".to_string()])
            .unwrap(),
    );
    assert_eq!(s.len(), 1);
    assert!(s[0].is_finite());
}

/// Concept removal's score is CLIPModel's cosine of each image with the concept prompt: PickScore's reference
/// matrix divided by `logit_scale.exp()` (the fixture's PickScore is a transformers `CLIPModel`), with the image
/// gradient of the matching entries; its loss is `+similarity`. Measured: f32 2.9e-7 / 1.4e-6, f64 3e-16 / 1.4e-15.
#[test]
fn concept_similarity_and_image_gradients_match_transformers() {
    use alignprop_rewards::concept::ConceptSimilarity;
    let r = refs();
    let d = Default::default();
    let p = prompts()[..2].to_vec();
    let m = models();
    for (dtype, sfx, tol) in [(DType::F32, "", 1e-4f64), (DType::F64, "_f64", 1e-9)] {
        let scale = pickscore::<I>(&m, dtype).logit_scale.val().exp();
        let scale = values(scale)[0];
        let matrix: Vec<f64> = ref_values(&r, &format!("pick_scores{sfx}"))
            .into_iter()
            .map(|v| v / scale)
            .collect();
        let grad_ref = values(ref_tensor_on::<I, 4>(
            &r,
            &format!("pick_grad_image{sfx}"),
            &d,
            dtype,
        ));
        let half = grad_ref.len() / 2;
        for (j, concept) in p.iter().enumerate() {
            let reward = ConceptSimilarity::new(pickscore::<A>(&m, dtype), concept).unwrap();
            let image: Tensor<A, 4> = ref_tensor_on(&r, "image", &d, dtype);
            let image = image.require_grad();
            let s = reward.score(image.clone()).unwrap();
            // Both images against concept j: column j of the (image, prompt) matrix.
            let want = [matrix[j], matrix[2 + j]];
            let e_s = err(&values(s.clone().inner()), &want);
            // Image j's gradient is that of the diagonal entry (j, j) of the reference.
            let g = values(image.grad(&s.clone().sum().backward()).unwrap());
            let g_scaled: Vec<f64> = grad_ref[j * half..(j + 1) * half]
                .iter()
                .map(|v| v / scale)
                .collect();
            let e_g = err(&g[j * half..(j + 1) * half], &g_scaled);
            eprintln!("concept {j} {dtype:?}: scores {e_s:.2e}, d score/d image {e_g:.2e}");
            assert!(
                e_s < tol && e_g < tol,
                "{dtype:?} concept {j}: {e_s:e} {e_g:e}"
            );
            let loss = reward.loss(s.clone());
            assert_eq!(
                values(loss.inner()),
                values(s.inner()),
                "loss = +similarity"
            );
        }
    }
}
