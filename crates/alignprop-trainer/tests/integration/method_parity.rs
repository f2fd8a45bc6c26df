//! ReFL's and DRaFT-LV's LoRA gradients equal PyTorch autograd's through the same computation
//! (`refs/methods.safetensors`, written by `xtask/fixtures/make_method_refs.py`: the tiny-sd UNet with the peft
//! LoRA file, 4 DDIM steps, eta 0, CFG 7.5, tiny reward, J = mean reward; float64, each reference gradient also
//! checked against finite differences there). Measured: J and the samples 1.4e-10 / 1.1e-10 relative, the gradients
//! 3.9e-9 (ReFL s = 2), 4.0e-9 (s = 3), 4.0e-9 (DRaFT-LV); bound 1e-8.

use alignprop_diffusion::unet::UNet2DConditionModel;
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_lora::LoraWeights;
use alignprop_pipeline::Conditioning;
use alignprop_rewards::tiny::TinyReward;
use alignprop_schedulers::{DdimScheduler, SchedulerConfig};
use alignprop_testing::{ref_tensor_on, ref_values, refs, rel_err_values, tiny_sd, values};
use alignprop_trainer::methods::{draft_lv, refl};
use alignprop_trainer::{ChainError, TrajectoryInput, TrajectoryOutput};
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
    scheduler: DdimScheduler,
}

fn setup() -> Setup {
    let (d, dtype) = (Default::default(), DType::F64);
    let r = refs("methods.safetensors");
    let mut unet = UNet2DConditionModel::<A>::load(tiny_sd().join("unet"), &d, dtype).unwrap();
    let lora =
        LoraWeights::read(&tiny_sd().join("lora_peft/pytorch_lora_weights.safetensors")).unwrap();
    alignprop_lora::apply(&mut unet, &lora, 1.0, true).unwrap();
    let cfg =
        SchedulerConfig::from_file(&tiny_sd().join("scheduler/scheduler_config.json")).unwrap();
    let scheduler = DdimScheduler::new(&cfg, 4).unwrap();
    let ts: Vec<f64> = scheduler.timesteps().iter().map(|&t| t as f64).collect();
    assert_eq!(ts, ref_values(&r, "timesteps"));
    Setup {
        unet,
        vae: AutoencoderKL::load(tiny_sd().join("vae"), &d, dtype).unwrap(),
        reward: TinyReward::load(&tiny_sd().join("reward"), &d, dtype).unwrap(),
        text: Conditioning::new(
            ref_tensor_on(&r, "uncond_embeds", &d, dtype),
            ref_tensor_on(&r, "cond_embeds", &d, dtype),
        ),
        x_t: ref_tensor_on(&r, "x_T", &d, dtype),
        scheduler,
    }
}

type Loss<'a> = Box<
    dyn Fn(Tensor<A, 4>) -> Result<(Tensor<A, 1>, Tensor<A, 1>), alignprop_trainer::RewardError>
        + 'a,
>;

fn input<'a>(s: &'a Setup) -> TrajectoryInput<'a, A, Loss<'a>> {
    TrajectoryInput {
        unet: &s.unet,
        vae: &s.vae,
        scheduler: &s.scheduler,
        text: &s.text,
        guidance: 7.5,
        x_t: s.x_t.clone(),
        noises: &[],
        grad_steps: &[],
        loss_fn: Box::new(|img| {
            let scores = s.reward.score(img);
            Ok((scores.clone().mean(), scores))
        }),
    }
}

/// J, the sample and every LoRA gradient against the reference under `prefix`; returns the gradient's
/// relative L2 error.
fn compare(out: &TrajectoryOutput<A>, prefix: &str) -> f64 {
    let r = refs("methods.safetensors");
    let j = ref_values(&r, &format!("{prefix}.J"))[0];
    assert!(
        ((out.loss - j) / j).abs() < 1e-9,
        "{prefix}: J {} vs {j}",
        out.loss
    );
    let (e_x, _) = rel_err_values(
        &values(out.final_latents.clone()),
        &ref_values(&r, &format!("{prefix}.x0")),
    );
    assert!(e_x < 1e-9, "{prefix}: sample rel {e_x:.2e}");
    let GradComparison { rel, norm, .. } =
        compare_grads(&out.grads, &r, &format!("{prefix}.grad.unet"), 256);
    assert!(
        norm > 0.0 && rel <= 1e-8,
        "{prefix}: gradient relative error {rel:.3e}"
    );
    rel
}

#[test]
fn refl_gradient_matches_pytorch_for_two_stop_steps() {
    let s = setup();
    for stop in [2, 3] {
        let out = refl(input(&s), stop).unwrap();
        let prefix = format!("refl.s{stop}");
        compare(&out, &prefix);
        let want = ref_values(&refs("methods.safetensors"), &format!("{prefix}.rewards"));
        let (e, _) = rel_err_values(&out.scores, &want);
        assert!(e < 1e-9, "{prefix}: rewards {:?} vs {want:?}", out.scores);
    }
    assert_eq!(
        refl(input(&s), 4).err(),
        Some(ChainError::StopStep { stop: 4, steps: 4 })
    );
}

#[test]
fn draft_lv_gradient_matches_pytorch() {
    let s = setup();
    let r = refs("methods.safetensors");
    let renoise: Vec<Tensor<I, 4>> = (0..2)
        .map(|j| {
            ref_tensor_on(
                &r,
                &format!("draft_lv.renoise.{j}"),
                &Default::default(),
                DType::F64,
            )
        })
        .collect();
    let out = draft_lv(input(&s), &renoise).unwrap();
    compare(&out, "draft_lv");
    let want = ref_values(&r, "draft_lv.rewards");
    let got: Vec<f64> = out.copy_scores.concat();
    let (e, _) = rel_err_values(&got, &want);
    assert!(e < 1e-9, "per-copy rewards {got:?} vs {want:?}");
    assert_eq!(out.copy_scores.len(), 2);
    // One copy is not the mean of two: the gradient changes.
    let one = draft_lv(input(&s), &renoise[..1]).unwrap();
    let a: Vec<f64> = one
        .grads
        .tensors
        .values()
        .flat_map(|g| values(g.clone()))
        .collect();
    let b: Vec<f64> = out
        .grads
        .tensors
        .values()
        .flat_map(|g| values(g.clone()))
        .collect();
    assert!(rel_err_values(&a, &b).0 > 1e-3);
    assert_eq!(draft_lv(input(&s), &[]).err(), Some(ChainError::NoCopies));
}
