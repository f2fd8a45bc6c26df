//! The gradient-reference checks shared by the SD 2.x and SDXL trainer tests: a fixture's UNet with its LoRA, its
//! VAE, tiny-sd's tiny reward, 4 DDIM steps with eta 1 and the stored noise, and the float64 / float32 PyTorch LoRA
//! gradients of `refs/alignprop_grad.safetensors` (full chain, K = 1, K = 2), as each fixture's README (f) describes.
#![allow(dead_code)]

use std::path::Path;

use alignprop_diffusion::unet::UNet2DConditionModel;
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_io::SafetensorsSource;
use alignprop_lora::LoraWeights;
use alignprop_pipeline::Conditioning;
use alignprop_rewards::tiny::TinyReward;
use alignprop_schedulers::{DdimScheduler, SchedulerConfig};
use alignprop_testing::{ref_tensor_on, ref_values, rel_err_values, tiny_sd, values};
use alignprop_trainer::{LoraGrads, TrajectoryInput, TrajectoryOutput, Truncation, trajectory};
use burn::backend::Autodiff;
use burn::tensor::{DType, Tensor};

pub type I = burn::backend::Flex;
pub type A = Autodiff<I>;

/// One fixture's gradient setup.
pub struct Setup {
    pub unet: UNet2DConditionModel<A>,
    pub vae: AutoencoderKL<A>,
    pub reward: TinyReward<A>,
    pub text: Conditioning<I>,
    pub x_t: Tensor<I, 4>,
    pub noises: Vec<Option<Tensor<I, 4>>>,
    pub scheduler: DdimScheduler,
    pub guidance: f64,
}

/// Loads `root`'s UNet with `root/lora/pytorch_lora_weights.safetensors`, its VAE and scheduler (DDIM, 4 steps,
/// eta 1), tiny-sd's reward, and the chain's inputs from `refs` (`x_T`, `variance_noise.{0..3}`); `text` builds the
/// conditioning from `refs` in `dtype`.
pub fn setup(
    root: &Path,
    refs: &SafetensorsSource,
    dtype: DType,
    guidance: f64,
    text: impl FnOnce(&SafetensorsSource, DType) -> Conditioning<I>,
) -> Setup {
    let d = Default::default();
    let mut unet = UNet2DConditionModel::<A>::load(root.join("unet"), &d, dtype).unwrap();
    let lora = LoraWeights::read(root.join("lora/pytorch_lora_weights.safetensors")).unwrap();
    alignprop_lora::apply(&mut unet, &lora, 1.0, true).unwrap();
    let cfg = SchedulerConfig::from_file(&root.join("scheduler/scheduler_config.json")).unwrap();
    let scheduler = DdimScheduler::new(&cfg, 4).unwrap().with_eta(1.0).unwrap();
    let ts: Vec<f64> = scheduler.timesteps().iter().map(|&t| t as f64).collect();
    assert_eq!(ts, ref_values(refs, "timesteps"));
    Setup {
        unet,
        vae: AutoencoderKL::load(root.join("vae"), &d, dtype).unwrap(),
        reward: TinyReward::load(&tiny_sd().join("reward"), &d, dtype).unwrap(),
        text: text(refs, dtype),
        x_t: ref_tensor_on(refs, "x_T", &d, dtype),
        noises: (0..4)
            .map(|i| {
                Some(ref_tensor_on(
                    refs,
                    &format!("variance_noise.{i}"),
                    &d,
                    dtype,
                ))
            })
            .collect(),
        scheduler,
        guidance,
    }
}

impl Setup {
    /// The chain's input with the steps `grad_steps` keeps and J = mean reward.
    pub fn input<'a>(
        &'a self,
        grad_steps: &'a [bool],
    ) -> TrajectoryInput<
        'a,
        A,
        impl Fn(Tensor<A, 4>) -> Result<(Tensor<A, 1>, Tensor<A, 1>), alignprop_trainer::RewardError>
        + 'a,
    > {
        TrajectoryInput {
            unet: &self.unet,
            vae: &self.vae,
            scheduler: &self.scheduler,
            text: &self.text,
            guidance: self.guidance,
            x_t: self.x_t.clone(),
            noises: &self.noises,
            grad_steps,
            loss_fn: |img| {
                let scores = self.reward.score(img);
                Ok((scores.clone().mean(), scores))
            },
        }
    }

    /// Our checkpointed chain with the steps `truncation` keeps.
    pub fn run(&self, truncation: Truncation) -> TrajectoryOutput<A> {
        let mut rng = alignprop_pipeline::NoiseRng::new(0);
        let grad_steps = truncation.grad_steps(4, &mut rng);
        trajectory(self.input(&grad_steps)).expect("every step's noise is given")
    }
}

/// Runs `setup`'s chain and compares the forward values (`final_latents_`, `reward_`, `J_` + `f64` / `f32`) and the
/// gradient under `grad_{which}_{f64,f32}.unet.<key>` (`n_tensors` of them) with relative L2 bound `tol`, for the
/// whole vector and for each tensor (relative to its own norm, with a floor of `tol` times the whole gradient's
/// norm). Returns the measured relative error.
pub fn check(
    s: &Setup,
    refs: &SafetensorsSource,
    dtype: DType,
    truncation: Truncation,
    which: &str,
    n_tensors: usize,
    tol: f64,
) -> f64 {
    let suffix = if dtype == DType::F64 { "f64" } else { "f32" };
    let prefix = format!("grad_{which}_{suffix}");
    let out = s.run(truncation);
    let (e_lat, _) = rel_err_values(
        &values(out.final_latents.clone()),
        &ref_values(refs, &format!("final_latents_{suffix}")),
    );
    let (e_r, _) = rel_err_values(&out.scores, &ref_values(refs, &format!("reward_{suffix}")));
    let j = ref_values(refs, &format!("J_{suffix}"))[0];
    let e_j = ((out.loss - j) / j).abs();
    eprintln!(
        "{prefix}: final latents rel {e_lat:.2e}, rewards rel {e_r:.2e}, J {} vs {j} (rel {e_j:.2e})",
        out.loss
    );
    assert!(
        e_lat < tol && e_r < tol && e_j < tol,
        "{prefix}: forward values"
    );

    let GradComparison {
        rel,
        norm,
        per_tensor,
        ..
    } = compare_grads(&out.grads, refs, &format!("{prefix}.unet"), n_tensors);
    assert!(
        rel <= tol,
        "{prefix}: gradient relative error {rel:.3e} > {tol:e}"
    );
    let mut worst = 0f64;
    for (key, diff, scale) in per_tensor {
        worst = worst.max(diff / (scale + norm));
        assert!(
            diff <= tol * (scale + norm),
            "{prefix}.{key}: |diff| {diff:.3e} vs |g| {scale:.3e}"
        );
    }
    eprintln!("{prefix}: worst tensor |diff| / (|g_tensor| + |g|) {worst:.3e}");
    rel
}

/// Our LoRA gradients against the references `{prefix}.<key>` (e.g. `grad_k1_f64.unet.<key>`).
pub struct GradComparison {
    /// Relative L2 error of the whole concatenated gradient.
    pub rel: f64,
    /// The L2 norm of the whole reference gradient.
    pub norm: f64,
    /// Per LoRA tensor: `(key, |ours - reference|, |reference|)` (L2 norms).
    pub per_tensor: Vec<(String, f64, f64)>,
}

/// Compares `grads` with the references `{prefix}.<key>` of `refs`, after asserting one gradient per LoRA tensor
/// (`n_tensors`); prints the whole vector's error.
pub fn compare_grads(
    grads: &LoraGrads<I>,
    refs: &SafetensorsSource,
    prefix: &str,
    n_tensors: usize,
) -> GradComparison {
    assert_eq!(
        grads.tensors.len(),
        n_tensors,
        "one gradient per LoRA tensor"
    );
    let (mut ours, mut theirs, mut per_tensor) = (Vec::new(), Vec::new(), Vec::new());
    for (key, g) in &grads.tensors {
        let a = values(g.clone());
        let b = ref_values(refs, &format!("{prefix}.{key}"));
        let diff = l2(a.iter().zip(&b).map(|(x, y)| x - y));
        per_tensor.push((key.clone(), diff, l2(b.iter().copied())));
        ours.extend(a);
        theirs.extend(b);
    }
    let (rel, max_abs) = rel_err_values(&ours, &theirs);
    let norm = l2(theirs.iter().copied());
    eprintln!("{prefix}: gradient rel L2 {rel:.3e} (max abs {max_abs:.2e}, |g| {norm:.3e})");
    GradComparison {
        rel,
        norm,
        per_tensor,
    }
}

/// The L2 norm of `v`.
fn l2(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// Full chain, K = 1, K = 2 with their reference names.
pub fn truncations() -> [(Truncation, &'static str); 3] {
    [
        (Truncation::Full, "full"),
        (Truncation::Fixed { k: 1 }, "k1"),
        (Truncation::Fixed { k: 2 }, "k2"),
    ]
}
