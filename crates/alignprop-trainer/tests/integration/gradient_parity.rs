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
use alignprop_trainer::{
    ChainError, RewardError, TrajectoryInput, Truncation, trajectory, trajectory_full_graph,
};
use burn::backend::Autodiff;
use burn::tensor::{DType, Tensor};

use crate::common::{GradComparison, compare_grads};

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
        text: Conditioning::new(
            ref_tensor_on(&r, "uncond_embeds", &d, dtype),
            ref_tensor_on(&r, "cond_embeds", &d, dtype),
        ),
        x_t: ref_tensor_on(&r, "x_T", &d, dtype),
        noises: (0..4)
            .map(|i| Some(ref_tensor_on(&r, &format!("variance_noise.{i}"), &d, dtype)))
            .collect(),
        scheduler: DdimScheduler::new(&cfg, 4).unwrap().with_eta(1.0).unwrap(),
    }
}

/// Our chain (4 DDIM steps, CFG 7.5, the given noise, J = mean tiny reward) with the steps `truncation` keeps.
fn run(s: &Setup, truncation: Truncation) -> alignprop_trainer::TrajectoryOutput<A> {
    let mut rng = alignprop_pipeline::NoiseRng::new(0);
    let grad_steps = truncation.grad_steps(4, &mut rng);
    trajectory(TrajectoryInput {
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
            Ok((scores.clone().mean(), scores))
        },
    })
    .expect("every step's noise is given")
}

/// Runs our chain and compares with the reference gradients under `prefix` (`grad_full_f64`, ...).
fn check(dtype: DType, truncation: Truncation, prefix: &str, suffix: &str, tol: f64) {
    let out = run(&setup(dtype), truncation);
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
    let GradComparison {
        rel,
        norm,
        per_tensor,
        ..
    } = compare_grads(&out.grads, &r, &format!("{prefix}.unet"), 256);
    assert!(
        rel <= tol,
        "{prefix}: gradient relative error {rel:.3e} > {tol:e}"
    );
    for (key, diff, scale) in per_tensor {
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
/// f32) gives LoRA gradients that point the same way as PyTorch's float32 ones (cosine > 0.985) and are within 15%
/// (relative L2) of them, for K = 1 and the full chain. bf16 keeps about 3 significant digits per op, and classifier-
/// free guidance multiplies the difference of two bf16 noise predictions by 7.5, so the chain loses about a digit:
/// measured 9.2% (cosine 0.996) for K = 1 and 13.0% (cosine 0.992) for the full chain, J within 1.2%; printed.
#[test]
fn bf16_base_gradient_is_close_to_f32() {
    let r = refs("alignprop_grad.safetensors");
    let mut measured = Vec::new();
    for (truncation, prefix) in [
        (Truncation::Fixed { k: 1 }, "grad_k1_f32"),
        (Truncation::Full, "grad_full_f32"),
    ] {
        let out = run(&setup(DType::BF16), truncation);
        assert_eq!(out.latent_grad.dtype(), DType::F32);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for (key, g) in &out.grads.tensors {
            assert_eq!(g.dtype(), DType::F32, "{key}");
            ours.extend(values(g.clone()));
            theirs.extend(ref_values(&r, &format!("{prefix}.unet.{key}")));
        }
        let (rel, _) = rel_err_values(&ours, &theirs);
        let dot: f64 = ours.iter().zip(&theirs).map(|(a, b)| a * b).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cosine = dot / (norm(&ours) * norm(&theirs));
        let j = ref_values(&r, "J_f32")[0];
        eprintln!(
            "bf16 base, {prefix}: LoRA gradient rel L2 {rel:.3e}, cosine {cosine:.5} vs float32 torch; J {} vs {j}",
            out.loss
        );
        measured.push((prefix, rel, cosine, ((out.loss - j) / j).abs()));
    }
    for (prefix, rel, cosine, j_err) in measured {
        assert!(
            rel < 0.15 && cosine > 0.985 && j_err < 0.03,
            "{prefix}: bf16 gradient rel err {rel:.3e}, cosine {cosine:.5}, J rel err {j_err:.2e}"
        );
    }
}

/// The loss of [`run_with`]'s chain.
#[derive(Clone, Copy)]
enum Loss {
    /// The mean tiny reward.
    Mean,
    /// A user reward that returns a constant (ignores the images).
    Constant,
    /// A reward that cannot score the images (e.g. a prompt reward called without prompts).
    Fails,
}

/// The reward error of [`Loss::Fails`].
fn reward_error() -> RewardError {
    RewardError::MissingPrompts {
        reward: "hps".into(),
        images: 1,
        prompts: 0,
    }
}

/// The chain with a scheduler, kept steps, noises and loss of the test's choosing, checkpointed or full-graph.
fn run_with(
    s: &Setup,
    scheduler: &DdimScheduler,
    grad_steps: &[bool],
    noises: &[Option<Tensor<I, 4>>],
    loss: Loss,
    full_graph: bool,
) -> Result<alignprop_trainer::TrajectoryOutput<A>, ChainError> {
    let input = TrajectoryInput {
        unet: &s.unet,
        vae: &s.vae,
        scheduler,
        text: &s.text,
        guidance: 7.5,
        x_t: s.x_t.clone(),
        noises,
        grad_steps,
        loss_fn: |img: Tensor<A, 4>| {
            let scores = s.reward.score(img);
            match loss {
                Loss::Mean => Ok((scores.clone().mean(), scores)),
                Loss::Constant => {
                    let c = Tensor::<A, 1>::ones([1], &scores.device());
                    Ok((c.clone(), c))
                }
                Loss::Fails => Err(reward_error()),
            }
        },
    };
    if full_graph {
        trajectory_full_graph(input)
    } else {
        trajectory(input)
    }
}

/// Steps with a detached noise prediction pass the latent gradient through the exact step Jacobian for v- and
/// sample prediction and with `clip_sample` (the epsilon-only shortcut `sqrt(a_prev) / sqrt(a_t)` is wrong there):
/// the checkpointed backward equals plain autodiff through the whole graph (float64 tensors; burn passes scalar
/// factors as float32, so the two groupings of the step's scalars differ by ~1e-7), for kept steps that are the
/// last one only and non-contiguous.
#[test]
fn detached_steps_are_exact_for_every_prediction_type_and_clipping() {
    let s = setup(DType::F64);
    let base =
        SchedulerConfig::from_file(&tiny_sd().join("scheduler/scheduler_config.json")).unwrap();
    for (prediction, clip) in [
        ("v_prediction", false),
        ("sample", false),
        ("epsilon", true),
        ("v_prediction", true),
    ] {
        let cfg = SchedulerConfig {
            prediction_type: prediction.into(),
            clip_sample: clip,
            // Tight enough that some of x0's elements are clamped at every step.
            clip_sample_range: 0.5,
            ..base.clone()
        };
        let scheduler = DdimScheduler::new(&cfg, 4).unwrap().with_eta(1.0).unwrap();
        for grad_steps in [[false, false, false, true], [false, true, false, true]] {
            let ours = run_with(&s, &scheduler, &grad_steps, &s.noises, Loss::Mean, false).unwrap();
            let full = run_with(&s, &scheduler, &grad_steps, &s.noises, Loss::Mean, true).unwrap();
            let (e_x, _) = rel_err_values(&values(ours.latent_grad), &values(full.latent_grad));
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for (key, g) in &ours.grads.tensors {
                a.extend(values(g.clone()));
                b.extend(values(full.grads.tensors[key].clone()));
            }
            let (e_g, _) = rel_err_values(&a, &b);
            eprintln!("{prediction} clip {clip} {grad_steps:?}: dL/dx_T {e_x:.2e}, LoRA {e_g:.2e}");
            assert!(
                e_x < 1e-6 && e_g < 1e-6,
                "{prediction} clip {clip} {grad_steps:?}: dL/dx_T {e_x:.2e}, LoRA gradient {e_g:.2e}"
            );
        }
    }
}

/// A step that adds noise without its noise given is refused (the forward and the recomputed backward would
/// draw different noise: a silently wrong gradient), as are kept-step flags of the wrong length.
#[test]
fn missing_noise_and_wrong_grad_steps_are_errors() {
    let s = setup(DType::F32);
    let mut noises = s.noises.clone();
    noises[2] = None;
    for full_graph in [false, true] {
        let e = run_with(
            &s,
            &s.scheduler,
            &[false, false, false, true],
            &noises,
            Loss::Mean,
            full_graph,
        );
        assert_eq!(e.err(), Some(ChainError::MissingNoise { step: 2 }));
        let e = run_with(
            &s,
            &s.scheduler,
            &[false, false, false, true],
            &noises[..1],
            Loss::Mean,
            full_graph,
        );
        assert_eq!(e.err(), Some(ChainError::MissingNoise { step: 1 }));
        let e = run_with(
            &s,
            &s.scheduler,
            &[true; 3],
            &s.noises,
            Loss::Mean,
            full_graph,
        );
        assert_eq!(
            e.err(),
            Some(ChainError::GradStepsLength {
                expected: 4,
                found: 3
            })
        );
    }
    // Deterministic DDIM (eta 0) needs no noise at all.
    let cfg =
        SchedulerConfig::from_file(&tiny_sd().join("scheduler/scheduler_config.json")).unwrap();
    let eta0 = DdimScheduler::new(&cfg, 4).unwrap();
    assert!(
        run_with(
            &s,
            &eta0,
            &[false, false, false, true],
            &[],
            Loss::Mean,
            false
        )
        .is_ok()
    );
}

/// A loss that does not depend on the images is an error, not a panic.
#[test]
fn a_loss_that_ignores_the_images_is_an_error() {
    let s = setup(DType::F32);
    for full_graph in [false, true] {
        let e = run_with(
            &s,
            &s.scheduler,
            &[false, false, false, true],
            &s.noises,
            Loss::Constant,
            full_graph,
        );
        assert_eq!(e.err(), Some(ChainError::LossIgnoresImages));
    }
}

/// A reward that cannot score the images (the loss closure's error) ends the trajectory with that error, in the
/// checkpointed and the full-graph chain, and its message is the reward's own.
#[test]
fn a_reward_error_in_the_loss_is_a_chain_error() {
    let s = setup(DType::F32);
    for full_graph in [false, true] {
        let e = run_with(
            &s,
            &s.scheduler,
            &[false, false, false, true],
            &s.noises,
            Loss::Fails,
            full_graph,
        )
        .err();
        assert_eq!(e, Some(ChainError::Reward(reward_error())));
        let msg = e.unwrap().to_string();
        assert!(
            msg.starts_with("hps: needs one prompt per image (1 image, 0 prompts)"),
            "{msg}"
        );
    }
}
