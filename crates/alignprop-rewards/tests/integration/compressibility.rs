//! The compressibility reward: the true JPEG size orders images as expected, the surrogate head fits JPEG sizes of
//! a set of images far better than their mean, and the saved head loads into a differentiable reward that predicts
//! what the fit predicted.

use std::path::PathBuf;

use alignprop_rewards::Reward;
use alignprop_rewards::clip_vision::CLIPVisionModel;
use alignprop_rewards::compressibility::{
    CompressibilityScorer, JPEG_QUALITY, clip_embedding, fit_head, jpeg_size_kib, save_head,
};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Tensor, TensorData};
use image::{Rgb, RgbImage};

type A = Autodiff<Flex>;

fn clip_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-reward/clip_vision")
}

/// A 48x48 picture: a smooth gradient plus deterministic pseudo-random noise of the given amplitude.
fn picture(amplitude: f64, seed: u64) -> RgbImage {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    RgbImage::from_fn(48, 48, |x, y| {
        let mut px = [0u8; 3];
        for (c, p) in px.iter_mut().enumerate() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let noise = ((s >> 40) as f64 / (1u64 << 24) as f64 - 0.5) * 2.0 * amplitude;
            let base = 60.0 + 2.0 * x as f64 + y as f64 + 20.0 * c as f64;
            *p = (base + noise).clamp(0.0, 255.0) as u8;
        }
        Rgb(px)
    })
}

fn to_tensor(pics: &[RgbImage]) -> Tensor<Flex, 4> {
    let (w, h) = pics[0].dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut v = Vec::with_capacity(pics.len() * 3 * h * w);
    for p in pics {
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    v.push(p.get_pixel(x as u32, y as u32)[c] as f32 / 127.5 - 1.0);
                }
            }
        }
    }
    Tensor::from_data(
        TensorData::new(v, [pics.len(), 3, h, w]),
        &Default::default(),
    )
}

#[test]
fn jpeg_size_grows_with_noise() {
    let sizes: Vec<f64> = [0.0, 20.0, 80.0]
        .iter()
        .map(|&a| jpeg_size_kib(&picture(a, 1), JPEG_QUALITY))
        .collect();
    assert!(sizes[0] < sizes[1] && sizes[1] < sizes[2], "{sizes:?}");
}

#[test]
fn surrogate_fits_and_loads_as_a_differentiable_reward() {
    let device = Default::default();
    let pics: Vec<RgbImage> = (0..24)
        .map(|i| picture((i % 8) as f64 * 15.0, i as u64))
        .collect();
    let sizes: Vec<f64> = pics
        .iter()
        .map(|p| jpeg_size_kib(p, JPEG_QUALITY))
        .collect();
    let clip = CLIPVisionModel::<Flex>::load(&clip_dir(), &device, DType::F32).unwrap();
    let emb = clip_embedding(&clip, to_tensor(&pics));
    let fit = fit_head::<A>(emb, &sizes, 64, 2000, 1e-2, 7);
    assert!(
        fit.mse < 0.2 * fit.mse_of_mean,
        "the surrogate does not fit: mse {} vs {} for the mean",
        fit.mse,
        fit.mse_of_mean
    );
    let dir = std::env::temp_dir().join(format!("alignprop-compress-{}", std::process::id()));
    let head = dir.join("head.safetensors");
    save_head(&fit, &head).unwrap();

    let scorer = CompressibilityScorer::<A>::load(&clip_dir(), &head, &device, DType::F32).unwrap();
    let images = Tensor::<A, 4>::from_inner(to_tensor(&pics)).require_grad();
    let pred: Vec<f64> = scorer
        .predicted_kib(images.clone())
        .inner()
        .into_data()
        .convert::<f64>()
        .to_vec()
        .unwrap();
    let mse = pred
        .iter()
        .zip(&sizes)
        .map(|(p, s)| (p - s).powi(2))
        .sum::<f64>()
        / sizes.len() as f64;
    assert!(
        (mse - fit.mse).abs() <= 1e-3 * fit.mse_of_mean,
        "the loaded head predicts differently: mse {mse} vs {}",
        fit.mse
    );
    let score = Reward::<A>::score(&scorer, images.clone()).unwrap();
    let grads = score.sum().backward();
    let g: Vec<f32> = images.grad(&grads).unwrap().into_data().to_vec().unwrap();
    assert!(g.iter().all(|v| v.is_finite()) && g.iter().any(|v| *v != 0.0));
    std::fs::remove_dir_all(&dir).ok();
}
