//! The activation memory of one training step of the full-size networks, measured on the CPU backend (ignored:
//! ~12 GB and minutes of compute; run with `cargo test -p alignprop-trainer --test memory_full_size -- --ignored
//! --nocapture`). It is the estimate behind README's memory-per-preset table: the autodiff graph is the same on
//! every backend (attention under autodiff is blockwise everywhere, so no score matrix is kept and every saved
//! tensor grows linearly with the latent area), so the peak heap bytes of
//!
//! - one checkpointed step's backward (LoRA rank 4 on every attention, CFG batch 2: the guided UNet call rebuilt
//!   with autodiff, then the backward of `sum(eps * g)`), the part the chain repeats step by step, and
//! - the VAE decoder's backward (`sum(decode_scaled(z) * g)`), done once per trajectory
//!
//! are measured at two small latent sizes and extrapolated linearly in the latent area to each preset's resolution.
//! The reward's backward (a ViT at 224 px) and the fused-kernel differences between backends are not included.

use alignprop_diffusion::unet::{TextTimeCond, UNet2DConditionConfig, UNet2DConditionModel};
use alignprop_diffusion::vae::{AutoencoderKL, AutoencoderKLConfig};
use alignprop_io::weights::VarBuilder;
use alignprop_pipeline::{AddedConditioning, Conditioning, guided_noise};
use alignprop_testing::alloc::{Counting, peak_during};
use burn::backend::Autodiff;
use burn::tensor::{DType, Distribution, Tensor};

#[global_allocator]
static GLOBAL: Counting = Counting;

type I = burn::backend::Flex;
type A = Autodiff<I>;

const GIB: f64 = (1u64 << 30) as f64;

fn randn<const D: usize>(shape: [usize; D]) -> Tensor<I, D> {
    Tensor::random(
        shape,
        Distribution::Normal(0.0, 1.0),
        (&Default::default(), DType::F32),
    )
}

/// Peak extra heap bytes of one checkpointed step's backward at latent `s x s` (batch 1, CFG).
fn unet_step_bytes(
    unet: &UNet2DConditionModel<A>,
    cross: usize,
    pooled: Option<usize>,
    s: usize,
) -> usize {
    let tt = |n| TextTimeCond::<I> {
        text_embeds: randn([n, pooled.unwrap()]),
        time_ids: TextTimeCond::<I>::time_ids(
            [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0],
            n,
            &Default::default(),
            DType::F32,
        ),
    };
    let text = Conditioning::<I> {
        uncond: randn([1, 77, cross]),
        cond: randn([1, 77, cross]),
        added: pooled.map(|_| AddedConditioning {
            uncond: tt(1),
            cond: tt(1),
        }),
    };
    let x = randn::<4>([1, 4, s, s]);
    let g = randn::<4>([1, 4, s, s]);
    peak_during(|| {
        let text = Conditioning::<A>::from_inner(&text);
        let eps = guided_noise(unet, Tensor::from_inner(x.clone()), 500.0, &text, 7.5);
        let grads = (eps * Tensor::from_inner(g.clone())).sum().backward();
        drop(grads);
    })
}

/// Peak extra heap bytes of the VAE decoder's backward from latents `s x s` (batch 1).
fn vae_bytes(vae: &AutoencoderKL<A>, s: usize) -> usize {
    let z = randn::<4>([1, 4, s, s]);
    let g = randn::<4>([1, 3, 8 * s, 8 * s]);
    peak_during(|| {
        let z = Tensor::<A, 4>::from_inner(z.clone()).require_grad();
        let grads = (vae.decode_scaled(z) * Tensor::from_inner(g.clone()))
            .sum()
            .backward();
        drop(grads);
    })
}

/// Extrapolates `(area, bytes)` measured at two sizes linearly to `target` latent side; GiB.
fn extrapolate(a: (usize, usize), b: (usize, usize), target: usize) -> f64 {
    let (x0, y0) = ((a.0 * a.0) as f64, a.1 as f64);
    let (x1, y1) = ((b.0 * b.0) as f64, b.1 as f64);
    let slope = (y1 - y0) / (x1 - x0);
    (y0 + slope * ((target * target) as f64 - x0)) / GIB
}

fn unet(
    cfg: &UNet2DConditionConfig,
    cross: usize,
    pooled: Option<usize>,
    name: &str,
    target: usize,
) {
    let d = Default::default();
    let vb = VarBuilder::<A>::random(&d, DType::F32);
    let mut unet = UNet2DConditionModel::new(cfg, &vb).unwrap();
    alignprop_lora::inject(&mut unet, &alignprop_lora::LoraConfig::default()).unwrap();
    let sizes = [16usize, 24];
    let m: Vec<(usize, usize)> = sizes
        .iter()
        .map(|&s| (s, unet_step_bytes(&unet, cross, pooled, s)))
        .collect();
    eprintln!(
        "{name} UNet step backward: {:.2} GiB at latent 16, {:.2} GiB at 24 -> {:.1} GiB at latent {target} ({} px)",
        m[0].1 as f64 / GIB,
        m[1].1 as f64 / GIB,
        extrapolate(m[0], m[1], target),
        8 * target
    );
    assert!(
        m[1].1 > m[0].1,
        "activation memory grows with the latent area"
    );
}

#[test]
#[ignore = "full-size networks: ~12 GB of float32 weights and minutes of CPU time"]
fn activation_memory_per_preset() {
    let sd21: UNet2DConditionConfig =
        serde_json::from_str(alignprop_testing::SD21_UNET_CONFIG).unwrap();
    let sdxl: UNet2DConditionConfig =
        serde_json::from_str(alignprop_testing::SDXL_UNET_CONFIG).unwrap();
    unet(&UNet2DConditionConfig::default(), 768, None, "SD1.5", 64);
    unet(&sd21, 1024, None, "SD 2.1", 96);
    unet(&sdxl, 2048, Some(1280), "SDXL", 128);
    let d = Default::default();
    let vae = AutoencoderKL::new(
        &AutoencoderKLConfig::default(),
        &VarBuilder::<A>::random(&d, DType::F32),
    )
    .unwrap();
    let m: Vec<(usize, usize)> = [16usize, 24]
        .iter()
        .map(|&s| (s, vae_bytes(&vae, s)))
        .collect();
    for target in [64usize, 96, 128] {
        eprintln!(
            "VAE decoder backward: {:.2} GiB at latent 16, {:.2} GiB at 24 -> {:.1} GiB at latent {target} ({} px)",
            m[0].1 as f64 / GIB,
            m[1].1 as f64 / GIB,
            extrapolate(m[0], m[1], target),
            8 * target
        );
    }
}
