//! The decisive test: the LoRA gradients of our checkpointed backward equal PyTorch autograd's gradient through
//! the same chain (`refs/alignprop_grad.safetensors`: LoRA UNet, 4 DDIM steps with CFG 7.5 and eta 1 with given
//! noise, VAE decode, tiny reward; objective J = mean reward), for the full chain and for K = 1, in float64 and
//! float32.

use alignprop_diffusion::unet::UNet2DConditionModel;
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_lora::LoraWeights;
use alignprop_pipeline::Conditioning;
use alignprop_rewards::tiny::TinyReward;
use alignprop_schedulers::{DdimScheduler, SchedulerConfig};
use alignprop_testing::{ref_tensor_on, ref_values, refs, rel_err_values, tiny_sd, values};
use alignprop_trainer::{TrajectoryInput, Truncation, trajectory};
use burn::backend::Autodiff;
use burn::tensor::{DType, Tensor};

type I = burn::backend::Flex;
type A = Autodiff<I>;

struct Setup {
    unet: UNet2DConditionModel<A>,
    vae: AutoencoderKL<A>,
    reward: TinyReward<A>,
    text: Conditioning<I>,
    x_t: Tensor<I, 4>,
    noises: Vec<Option<Tensor<I, 4>>>,
    scheduler: DdimScheduler,
}

fn setup(dtype: DType) -> Setup {
    let d = Default::default();
    let r = refs("alignprop_grad.safetensors");
    let mut unet = UNet2DConditionModel::<A>::load(&tiny_sd().join("unet"), &d, dtype).unwrap();
    let lora =
        LoraWeights::read(&tiny_sd().join("lora_peft/pytorch_lora_weights.safetensors")).unwrap();
    alignprop_lora::apply(&mut unet, &lora, 1.0, true).unwrap();
    let cfg =
        SchedulerConfig::from_file(&tiny_sd().join("scheduler/scheduler_config.json")).unwrap();
    Setup {
        unet,
        vae: AutoencoderKL::load(&tiny_sd().join("vae"), &d, dtype).unwrap(),
        reward: TinyReward::load(&tiny_sd().join("reward"), &d, dtype).unwrap(),
        text: Conditioning {
            uncond: ref_tensor_on(&r, "uncond_embeds", &d, dtype),
            cond: ref_tensor_on(&r, "cond_embeds", &d, dtype),
        },
        x_t: ref_tensor_on(&r, "x_T", &d, dtype),
        noises: (0..4)
            .map(|i| Some(ref_tensor_on(&r, &format!("variance_noise.{i}"), &d, dtype)))
            .collect(),
        scheduler: DdimScheduler::new(&cfg, 4).unwrap().with_eta(1.0).unwrap(),
    }
}

/// Runs our chain and compares with the reference gradients under `prefix` (`grad_full_f64`, ...).
fn check(dtype: DType, truncation: Truncation, prefix: &str, suffix: &str, tol: f64) {
    let s = setup(dtype);
    let mut rng = alignprop_pipeline::NoiseRng::new(0);
    let grad_steps = truncation.grad_steps(4, &mut rng);
    let out = trajectory(TrajectoryInput {
        unet: &s.unet,
        vae: &s.vae,
        scheduler: &s.scheduler,
        text: &s.text,
        guidance: 7.5,
        x_t: s.x_t.clone(),
        noises: &s.noises,
        grad_steps: &grad_steps,
        loss_fn: |img| {
            let scores = s.reward.score(img);
            (scores.clone().mean(), scores)
        },
    });
    let r = refs("alignprop_grad.safetensors");
    // Forward values first.
    let (e_lat, _) = rel_err_values(
        &values(out.final_latents.clone()),
        &ref_values(&r, &format!("final_latents_{suffix}")),
    );
    let j = ref_values(&r, &format!("J_{suffix}"))[0];
    eprintln!(
        "{prefix}: final latents rel {e_lat:.2e}, J {} vs {j}",
        out.loss
    );
    assert!(e_lat < 1e-4 && ((out.loss - j) / j).abs() < 1e-4);
    // Gradients: the whole concatenated vector, and each tensor with an absolute floor.
    assert_eq!(out.grads.tensors.len(), 256, "one gradient per LoRA tensor");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut per_tensor = Vec::new();
    for (key, g) in &out.grads.tensors {
        let a = values(g.clone());
        let b = ref_values(&r, &format!("{prefix}.unet.{key}"));
        per_tensor.push((key.clone(), a.clone(), b.clone()));
        ours.extend(a);
        theirs.extend(b);
    }
    let (rel, max_abs) = rel_err_values(&ours, &theirs);
    let norm = theirs.iter().map(|x| x * x).sum::<f64>().sqrt();
    eprintln!("{prefix}: gradient rel L2 {rel:.3e} (max abs {max_abs:.2e}, |g| {norm:.3e})");
    assert!(
        rel <= tol,
        "{prefix}: gradient relative error {rel:.3e} > {tol:e}"
    );
    for (key, a, b) in per_tensor {
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt();
        let scale = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        assert!(
            diff <= tol * scale + 1e-6 * norm,
            "{prefix}.{key}: |diff| {diff:.3e} vs |g| {scale:.3e}"
        );
    }
}

#[test]
fn full_chain_f64() {
    check(DType::F64, Truncation::Full, "grad_full_f64", "f64", 1e-4);
}

#[test]
fn k1_f64() {
    check(
        DType::F64,
        Truncation::Fixed { k: 1 },
        "grad_k1_f64",
        "f64",
        1e-4,
    );
}

#[test]
fn full_chain_f32() {
    check(DType::F32, Truncation::Full, "grad_full_f32", "f32", 1e-3);
}

#[test]
fn k1_f32() {
    check(
        DType::F32,
        Truncation::Fixed { k: 1 },
        "grad_k1_f32",
        "f32",
        1e-3,
    );
}

/// A bfloat16 base (frozen UNet, VAE and reward in bf16; LoRA adapters, the latent gradient and the gradients in
/// f32) gives the K = 1 and full-chain LoRA gradients within 5% (relative L2) of PyTorch's float32 ones: bf16 keeps
/// about 3 significant digits per op, and the gradient passes through every layer of the chain. Measured: see the
/// printed figures (README, "Precision").
#[test]
fn bf16_base_gradient_is_close_to_f32() {
    for (truncation, prefix) in [
        (Truncation::Fixed { k: 1 }, "grad_k1_f32"),
        (Truncation::Full, "grad_full_f32"),
    ] {
        let s = setup(DType::BF16);
        let mut rng = alignprop_pipeline::NoiseRng::new(0);
        let grad_steps = truncation.grad_steps(4, &mut rng);
        let out = trajectory(TrajectoryInput {
            unet: &s.unet,
            vae: &s.vae,
            scheduler: &s.scheduler,
            text: &s.text,
            guidance: 7.5,
            x_t: s.x_t.clone(),
            noises: &s.noises,
            grad_steps: &grad_steps,
            loss_fn: |img| {
                let scores = s.reward.score(img);
                (scores.clone().mean(), scores)
            },
        });
        assert_eq!(out.latent_grad.dtype(), DType::F32);
        let r = refs("alignprop_grad.safetensors");
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for (key, g) in &out.grads.tensors {
            assert_eq!(g.dtype(), DType::F32, "{key}");
            ours.extend(values(g.clone()));
            theirs.extend(ref_values(&r, &format!("{prefix}.unet.{key}")));
        }
        let (rel, _) = rel_err_values(&ours, &theirs);
        let j = ref_values(&r, "J_f32")[0];
        eprintln!(
            "bf16 base, {prefix}: LoRA gradient rel L2 {rel:.3e} vs float32 torch; J {} vs {j}",
            out.loss
        );
        assert!(rel < 5e-2, "{prefix}: bf16 gradient rel err {rel:.3e}");
        assert!(((out.loss - j) / j).abs() < 2e-2);
    }
}
