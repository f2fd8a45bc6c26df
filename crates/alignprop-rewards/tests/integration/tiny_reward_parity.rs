//! The preprocessing and the tiny reward against PyTorch (`refs/resize.safetensors`,
//! `refs/alignprop_grad.safetensors`), in float32 and float64.

use alignprop_rewards::preprocess::{CLIP_MEAN, CLIP_STD, clip_preprocess, resize_bilinear};
use alignprop_rewards::tiny::TinyReward;
use alignprop_testing::{ref_tensor_on, refs, rel_err, tiny_sd};
use burn::tensor::{DType, Tensor};

type B = burn::backend::Flex;

fn fixture() -> std::path::PathBuf {
    tiny_sd()
}

fn load<const D: usize>(file: &str, key: &str, dtype: DType) -> Tensor<B, D> {
    ref_tensor_on(&refs(file), key, &Default::default(), dtype)
}

fn rel<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    rel_err(a, b).0
}

#[test]
fn bilinear_resize_matches_torch_without_antialias() {
    for size in [32usize, 40] {
        let x = load::<4>("resize.safetensors", "input", DType::F32);
        let expected = load::<4>(
            "resize.safetensors",
            &format!("bilinear_{size}_antialias0"),
            DType::F32,
        );
        let e = rel(resize_bilinear(x, [size, size]), expected);
        assert!(e < 1e-6, "bilinear {size}: {e:e}");
    }
}

#[test]
fn tiny_reward_matches_torch_f64_and_f32() {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
        let reward =
            TinyReward::<B>::load(&fixture().join("reward"), &Default::default(), dtype).unwrap();
        let image = load::<4>("alignprop_grad.safetensors", "image_f64", dtype);
        let pre = clip_preprocess(image.clone(), 32, CLIP_MEAN, CLIP_STD);
        let e_pre = rel(
            pre,
            load(
                "alignprop_grad.safetensors",
                "reward_preprocessed_f64",
                dtype,
            ),
        );
        let e_emb = rel(
            reward.embed(image.clone()),
            load("alignprop_grad.safetensors", "reward_embedding_f64", dtype),
        );
        let e_r = rel(
            reward.score(image),
            load("alignprop_grad.safetensors", "reward_f64", dtype),
        );
        eprintln!("{dtype:?}: preprocess {e_pre:.2e}, embedding {e_emb:.2e}, reward {e_r:.2e}");
        assert!(
            e_pre < tol && e_emb < tol && e_r < tol,
            "{dtype:?}: {e_pre:e} {e_emb:e} {e_r:e}"
        );
    }
}

#[test]
fn reward_is_differentiable_wrt_the_image() {
    use burn::backend::Autodiff;
    type A = Autodiff<B>;
    let device = Default::default();
    let reward = TinyReward::<A>::load(&fixture().join("reward"), &device, DType::F64).unwrap();
    let image: Tensor<A, 4> = Tensor::from_inner(load::<4>(
        "alignprop_grad.safetensors",
        "image_f64",
        DType::F64,
    ))
    .require_grad();
    let score = reward.score(image.clone()).sum();
    let base = scalar(score.clone().inner());
    let g = image.grad(&score.backward()).unwrap();
    // Directional finite difference along the gradient itself.
    let h = 1e-4;
    let gn = scalar(g.clone().square().sum());
    let moved = image.inner() + g * (h / gn.sqrt());
    let plain = TinyReward::<B>::load(&fixture().join("reward"), &device, DType::F64).unwrap();
    let shifted = scalar(plain.score(moved).sum());
    let fd = (shifted - base) / h;
    assert!(
        ((fd - gn.sqrt()) / gn.sqrt()).abs() < 1e-3,
        "finite difference {fd} vs |g| {}",
        gn.sqrt()
    );
}

fn scalar(t: Tensor<B, 1>) -> f64 {
    t.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0]
}
