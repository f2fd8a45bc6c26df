//! CLIP vision transformer + LAION-style aesthetic head against transformers / torch
//! (`tests/fixtures/tiny-reward`, made by `xtask/fixtures/make_reward_refs.py`): preprocessing, embeddings,
//! scores and the gradient of the score with respect to the image, in f32 and f64.

use std::path::PathBuf;

use alignprop_io::weights::SafetensorsSource;
use alignprop_rewards::aesthetic::AestheticScorer;
use alignprop_rewards::preprocess::{CLIP_MEAN, CLIP_STD, clip_preprocess};
use alignprop_testing::{ref_tensor_on, rel_err};
use burn::backend::Autodiff;
use burn::tensor::{DType, Tensor};

type I = burn::backend::Flex;
type A = Autodiff<I>;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-reward")
}

fn refs() -> SafetensorsSource {
    SafetensorsSource::open(&[dir().join("refs.safetensors")]).unwrap()
}

#[test]
fn scores_and_image_gradients_match_torch() {
    let r = refs();
    let d = Default::default();
    for (dtype, sfx, tol) in [(DType::F32, "", 1e-4), (DType::F64, "_f64", 1e-9)] {
        let scorer = AestheticScorer::<A>::load(
            &dir().join("clip_vision"),
            &dir().join("aesthetic/mlp.safetensors"),
            &d,
            dtype,
        )
        .unwrap();
        let image: Tensor<A, 4> = ref_tensor_on(&r, "image", &d, dtype);
        let image = image.require_grad();
        let px = clip_preprocess(image.clone(), 32, CLIP_MEAN, CLIP_STD);
        let (e_px, _) = rel_err(
            px.clone().inner(),
            ref_tensor_on(&r, &format!("pixel_values{sfx}"), &d, dtype),
        );
        let (e_emb, _) = rel_err(
            scorer.clip.forward(px).inner(),
            ref_tensor_on(&r, &format!("image_embeds{sfx}"), &d, dtype),
        );
        let score = scorer.score(image.clone());
        let (e_s, _) = rel_err(
            score.clone().inner(),
            ref_tensor_on(&r, &format!("score{sfx}"), &d, dtype),
        );
        let g = image.grad(&score.sum().backward()).unwrap();
        let (e_g, _) = rel_err(g, ref_tensor_on(&r, &format!("grad_image{sfx}"), &d, dtype));
        eprintln!(
            "{dtype:?}: pixel_values {e_px:.2e}, embeds {e_emb:.2e}, score {e_s:.2e}, d score/d image {e_g:.2e}"
        );
        assert!(
            e_px < tol && e_emb < tol && e_s < tol && e_g < tol.max(1e-4),
            "{dtype:?}: {e_px:e} {e_emb:e} {e_s:e} {e_g:e}"
        );
    }
}

#[test]
fn aesthetic_loss_is_distance_to_target() {
    use alignprop_rewards::Reward;
    let d = Default::default();
    let scorer = AestheticScorer::<I>::load(
        &dir().join("clip_vision"),
        &dir().join("aesthetic/mlp.safetensors"),
        &d,
        DType::F32,
    )
    .unwrap();
    let s = Tensor::<I, 1>::from_floats([9.0, 11.5], &d);
    let l: Vec<f32> = scorer.loss(s).into_data().to_vec().unwrap();
    assert_eq!(l, [1.0, 1.5]);
}

#[test]
fn wrong_head_file_is_a_clear_error() {
    let d = Default::default();
    let err = AestheticScorer::<I>::load(
        &dir().join("clip_vision"),
        &dir().join("refs.safetensors"),
        &d,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("layers.0.weight") && err.contains("refs.safetensors"),
        "{err}"
    );
}

#[test]
fn laion_style_pth_head_loads_and_converts() {
    use alignprop_rewards::aesthetic::AestheticMlp;
    use alignprop_testing::values;
    let d = Default::default();
    let pth = dir().join("aesthetic/mlp.pth");
    let st = dir().join("aesthetic/mlp.safetensors");
    let a = AestheticMlp::<I>::load(&pth, &d, DType::F32).unwrap();
    let b = AestheticMlp::<I>::load(&st, &d, DType::F32).unwrap();
    let x = Tensor::<I, 2>::ones([2, 16], &d);
    assert_eq!(values(a.forward(x.clone())), values(b.forward(x.clone())));
    // Conversion to safetensors gives the same tensors.
    let out =
        std::env::temp_dir().join(format!("alignprop-mlp-{}.safetensors", std::process::id()));
    assert_eq!(
        alignprop_io::pth::pth_to_safetensors(&pth, &out).unwrap(),
        10
    );
    let c = AestheticMlp::<I>::load(&out, &d, DType::F32).unwrap();
    assert_eq!(values(c.forward(x.clone())), values(b.forward(x)));
    std::fs::remove_file(&out).ok();
    // A file that is not a PyTorch archive is a clear error naming it.
    let bad = dir().join("clip_vision/config.json");
    let bad_pth = std::env::temp_dir().join(format!("alignprop-bad-{}.pth", std::process::id()));
    std::fs::copy(&bad, &bad_pth).unwrap();
    let err = AestheticMlp::<I>::load(&bad_pth, &d, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("alignprop-bad"), "{err}");
    std::fs::remove_file(&bad_pth).ok();
}

/// The real predictor's shapes: OpenAI CLIP ViT-L/14 (the `CLIPVisionConfig` defaults) into LAION's head
/// 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (927,969 parameters), random weights, one 224x224 forward.
#[test]
#[ignore = "full-size ViT-L/14: ~1.2 GB of random weights and a slow CPU forward"]
fn real_vit_l14_aesthetic_config_builds_and_runs() {
    use alignprop_diffusion::nn::Linear;
    use alignprop_io::VarBuilder;
    use alignprop_rewards::aesthetic::{AestheticMlp, LAION_LINEAR_INDICES};
    use alignprop_rewards::clip_vision::{CLIPVisionConfig, CLIPVisionModel};
    use burn::module::Module;
    let d = Default::default();
    let vb = VarBuilder::<I>::random(&d, DType::F32);
    let cfg = CLIPVisionConfig::default();
    let clip = CLIPVisionModel::new(&cfg, &vb).unwrap();
    let widths = [768, 1024, 128, 64, 16, 1];
    let layers: Vec<Linear<I>> = LAION_LINEAR_INDICES
        .iter()
        .enumerate()
        .map(|(j, i)| Linear::new(&vb.pp("layers").pp(i), widths[j], widths[j + 1], true).unwrap())
        .collect();
    let mlp = AestheticMlp { layers };
    assert_eq!(mlp.num_params(), 927_969);
    let scorer = AestheticScorer {
        clip,
        mlp,
        target: 10.0,
    };
    let images = Tensor::<I, 4>::random(
        [1, 3, 256, 256],
        burn::tensor::Distribution::Uniform(-1.0, 1.0),
        &d,
    );
    let s: Vec<f32> = scorer.score(images).into_data().to_vec().unwrap();
    assert_eq!(s.len(), 1);
    assert!(s[0].is_finite());
}
