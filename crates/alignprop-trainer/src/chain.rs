//! The differentiable sampling chain with our own checkpointed backward.
//!
//! One trajectory is `x_T -> (DDIM step with guided UNet noise) x n -> VAE decode -> reward -> loss`. Storing the
//! autodiff graph of every UNet call would take memory linear in the number of steps (gigabytes per step at SD
//! size), so instead:
//!
//! 1. **Forward, no graph.** Run the whole chain on the inner (non-autodiff) backend, keeping only each step's
//!    input latent `x_i` and its noise `z_i` (a few kilobytes each).
//! 2. **Loss gradient.** Decode `x_n` and score it with autodiff on, giving `g_n = dL/dx_n`.
//! 3. **Backward, one step at a time.** For `i = n-1, ..., first kept step`: rebuild step `i` with autodiff from the
//!    stored `x_i`, take the vector-Jacobian product with `g_{i+1}` (backward of `sum(x_{i+1} * g_{i+1})`), add the
//!    LoRA gradients it yields, and carry `g_i = dL/dx_i` on. The graph of one step is freed before the next is
//!    built, so activation memory does not grow with the number of kept steps.
//!
//! Steps whose noise prediction is detached (before the truncation point, or the random detaches of the first
//! AlignProp release) contribute no parameter gradient; the latent gradient still passes through their DDIM update
//! with the model output held fixed ([`DdimScheduler::step_sample_vjp`]: `sqrt(a_prev) / sqrt(a_t)` for epsilon
//! prediction, the v / sample slopes otherwise, and the clamp's mask with `clip_sample`).
//!
//! Refused with a [`ChainError`] rather than computed wrongly: a step that adds noise (eta > 0) without its noise
//! in `noises` (the forward and the recomputed backward would draw different noise), `grad_steps` of the wrong
//! length, and a loss that does not depend on the images. A reward that cannot score the images (the loss closure's
//! [`RewardError`]) ends the trajectory with [`ChainError::Reward`].

use alignprop_diffusion::unet::UNet2DConditionModel;
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_pipeline::{Conditioning, guided_noise};
use alignprop_schedulers::{DdimScheduler, Scheduler};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor};

use alignprop_rewards::RewardError;

use crate::lora_params::{LoraGrads, adapters, lora_grads_from};

/// Why a trajectory cannot be differentiated as asked.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChainError {
    #[error("grad_steps has {found} entries for a chain of {expected} steps")]
    GradStepsLength { expected: usize, found: usize },
    #[error(
        "step {step} adds noise (eta > 0) but noises[{step}] is missing: the forward pass and the recomputed \
         backward would draw different noise (pass the noise of every step that needs_noise)"
    )]
    MissingNoise { step: usize },
    #[error(
        "the loss does not depend on the generated images (a reward that ignores its input?): there is no gradient \
         to backpropagate"
    )]
    LossIgnoresImages,
    /// The loss closure's reward could not score the decoded images (its one-line message, naming the reward).
    #[error(transparent)]
    Reward(#[from] RewardError),
    #[error("ReFL's stop step {stop} is not a step of this {steps}-step chain (0 ..= {})", steps.saturating_sub(1))]
    StopStep { stop: usize, steps: usize },
    #[error("DRaFT-LV needs at least one re-noised copy (method.copies >= 1)")]
    NoCopies,
}

/// Checks the inputs the forward and the recomputed backward must agree on.
fn check_inputs<B: AutodiffBackend, F>(
    input: &TrajectoryInput<'_, B, F>,
) -> Result<(), ChainError> {
    let n = input.scheduler.timesteps().len();
    if input.grad_steps.len() != n {
        return Err(ChainError::GradStepsLength {
            expected: n,
            found: input.grad_steps.len(),
        });
    }
    check_noise(input)
}

/// Every step that adds noise has its noise given (a recomputed step must see the same noise).
pub(crate) fn check_noise<B: AutodiffBackend, F>(
    input: &TrajectoryInput<'_, B, F>,
) -> Result<(), ChainError> {
    let n = input.scheduler.timesteps().len();
    match (0..n).find(|&i| {
        input.scheduler.needs_noise(i) && input.noises.get(i).is_none_or(Option::is_none)
    }) {
        Some(step) => Err(ChainError::MissingNoise { step }),
        None => Ok(()),
    }
}

/// What one trajectory needs: the models, the sampler, the conditioning, the noise, which steps carry gradient,
/// and the loss. `B` is the autodiff backend; the stored tensors live on its inner backend (no graph).
pub struct TrajectoryInput<'a, B: AutodiffBackend, F> {
    /// The UNet with its LoRA adapters (the only parameters that receive gradient).
    pub unet: &'a UNet2DConditionModel<B>,
    /// The (frozen) VAE whose decoder turns the final latents into images.
    pub vae: &'a AutoencoderKL<B>,
    /// The DDIM sampler; its number of timesteps is the number of steps `n`.
    pub scheduler: &'a DdimScheduler,
    /// Text conditioning, `uncond` and `cond` each `[batch, tokens, dim]` (constant: the text encoder is frozen).
    pub text: &'a Conditioning<B::InnerBackend>,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// Initial noise `x_T`, `[batch, 4, h, w]`.
    pub x_t: Tensor<B::InnerBackend, 4>,
    /// `noises[i]`: the DDIM noise `[batch, 4, h, w]` of step `i`: required for every step that
    /// [`Scheduler::needs_noise`] (eta > 0), `None` (or absent) for the others.
    pub noises: &'a [Option<Tensor<B::InnerBackend, 4>>],
    /// `grad_steps[i]`: whether step `i`'s noise prediction carries gradient (e.g. only the last K); length `n`.
    pub grad_steps: &'a [bool],
    /// `loss_fn(images [batch, 3, H, W]) -> (scalar loss [1], per-image scores [batch])`, built from autodiff ops;
    /// its error (a reward that cannot score the images) becomes [`ChainError::Reward`].
    pub loss_fn: F,
}

/// The result of one trajectory's forward and backward (checkpointed or full-graph: the same values).
pub struct TrajectoryOutput<B: AutodiffBackend> {
    /// The scalar loss.
    pub loss: f64,
    /// Per-image reward scores `[batch]` (as returned by the loss closure).
    pub scores: Vec<f64>,
    /// `x_0` latents `[batch, 4, h, w]`.
    pub final_latents: Tensor<B::InnerBackend, 4>,
    /// Decoded images `[batch, 3, H, W]`.
    pub images: Tensor<B::InnerBackend, 4>,
    /// dLoss/dLoRA, summed over the steps that carry gradient (each `[rank, in]` or `[out, rank]`).
    pub grads: LoraGrads<B::InnerBackend>,
    /// `dL/dx_T` `[batch, 4, h, w]` (the latent gradient that reached the initial noise), f32 for every model dtype.
    pub latent_grad: Tensor<B::InnerBackend, 4>,
    /// DRaFT-LV ([`crate::methods::draft_lv`]): each re-noised copy's per-image scores; empty otherwise.
    pub copy_scores: Vec<Vec<f64>>,
}

/// Runs one trajectory and its checkpointed backward (see the module docs).
pub fn trajectory<B, F>(input: TrajectoryInput<'_, B, F>) -> Result<TrajectoryOutput<B>, ChainError>
where
    B: AutodiffBackend,
    F: Fn(Tensor<B, 4>) -> Result<(Tensor<B, 1>, Tensor<B, 1>), RewardError>,
{
    check_inputs(&input)?;
    let TrajectoryInput {
        unet,
        vae,
        scheduler,
        text,
        guidance,
        x_t,
        noises,
        grad_steps,
        loss_fn,
    } = input;
    let n = scheduler.timesteps().len();
    let noise = |i: usize| noises.get(i).cloned().flatten();

    // 1. Forward on the inner backend, storing each step's input and guided model output (the detached steps'
    // VJPs read them: a few kilobytes per step).
    let NoGradRun {
        inputs,
        outputs,
        sample: x,
    } = forward_no_grad(unet, scheduler, text, guidance, x_t, noises, n);

    // 2. Loss and dL/dx_n through the decoder and the reward.
    let x_n = Tensor::<B, 4>::from_inner(x.clone()).require_grad();
    let images = vae.decode_scaled(x_n.clone());
    let (loss, scores) = loss_fn(images.clone())?;
    let loss_value = scalar(loss.clone().inner());
    let scores = f64_values(scores.inner());
    let grads = backward_tracked(loss);
    // The latent gradient is carried in f32, or f64 for an f64 model ([`carry_dtype`]).
    let carry = carry_dtype(x.dtype());
    let mut g = x_n
        .grad(&grads)
        .ok_or(ChainError::LossIgnoresImages)?
        .cast(carry);
    drop(grads);

    // 3. Backward through the steps, one recomputed step at a time.
    let mut acc = LoraGrads::default();
    let text_ad = autodiff_text::<B>(text);
    let first = first_kept(grad_steps);
    for i in (first..n).rev() {
        if grad_steps[i] {
            let xi = Tensor::<B, 4>::from_inner(inputs[i].clone()).require_grad();
            let t = scheduler.timesteps()[i] as f64;
            let eps = guided_noise(unet, xi.clone(), t, &text_ad, guidance);
            let next = scheduler
                .step(eps, i, xi.clone(), noise(i).map(Tensor::from_inner))
                .prev_sample;
            let vjp = alignprop_kernels::vjp_scalar(next.cast(carry), Tensor::from_inner(g));
            let grads = vjp.backward();
            acc.add(lora_grads_from(unet, &grads));
            g = xi
                .grad(&grads)
                .expect("the step depends on its input")
                .cast(carry);
        } else {
            g = scheduler.step_sample_vjp(i, g, outputs[i].clone(), inputs[i].clone());
        }
    }

    Ok(TrajectoryOutput {
        loss: loss_value,
        scores,
        final_latents: x,
        images: images.inner(),
        grads: acc,
        latent_grad: carry_to_noise(scheduler, first, g, &outputs, &inputs).cast(DType::F32),
        copy_scores: Vec::new(),
    })
}

/// The steps `0..upto` of a chain run without gradient ([`forward_no_grad`]).
pub(crate) struct NoGradRun<B: burn::tensor::backend::Backend> {
    /// Each step's input latents `[batch, 4, h, w]`.
    pub inputs: Vec<Tensor<B, 4>>,
    /// Each step's guided model output `[batch, 4, h, w]`.
    pub outputs: Vec<Tensor<B, 4>>,
    /// The sample after step `upto - 1` (`x_t` when `upto` is 0).
    pub sample: Tensor<B, 4>,
}

/// Runs the guided steps `0..upto` from `x_t` on the inner backend (no autodiff graph), with step `i`'s noise
/// `noises[i]`, recording each step's input and guided model output: what the detached steps' VJPs and
/// [`carry_to_noise`] read (a few kilobytes per step).
pub(crate) fn forward_no_grad<B: AutodiffBackend>(
    unet: &UNet2DConditionModel<B>,
    scheduler: &DdimScheduler,
    text: &Conditioning<B::InnerBackend>,
    guidance: f64,
    x_t: Tensor<B::InnerBackend, 4>,
    noises: &[Option<Tensor<B::InnerBackend, 4>>],
    upto: usize,
) -> NoGradRun<B::InnerBackend> {
    let inner_unet = unet.valid();
    let (mut inputs, mut outputs) = (Vec::with_capacity(upto), Vec::with_capacity(upto));
    let mut x = x_t;
    for i in 0..upto {
        inputs.push(x.clone());
        let t = scheduler.timesteps()[i] as f64;
        let eps = guided_noise(&inner_unet, x.clone(), t, text, guidance);
        outputs.push(eps.clone());
        x = scheduler
            .step(eps, i, x, noises.get(i).cloned().flatten())
            .prev_sample;
    }
    NoGradRun {
        inputs,
        outputs,
        sample: x,
    }
}

/// The dtype the latent gradient `dL/dx_i` is carried in through the steps, for latents of `dtype`: f32, so that
/// in bf16 / f16 its ~3 significant digits are not lost again at every step it passes through; f64 for f64 models
/// (rounding it to f32 at every step would put a ~6e-8 relative error into every float64 LoRA gradient).
pub(crate) fn carry_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The index of the first step that carries gradient (`grad_steps.len()` when none does).
fn first_kept(grad_steps: &[bool]) -> usize {
    grad_steps
        .iter()
        .position(|&k| k)
        .unwrap_or(grad_steps.len())
}

/// Carries `g = dL/dx_first` back to `dL/dx_T` through the steps before the first kept one (their model outputs
/// held fixed; no parameters). `g`: `[batch, 4, h, w]`; `outputs[i]`, `inputs[i]`: step `i`'s model output and input.
pub(crate) fn carry_to_noise<B: burn::tensor::backend::Backend>(
    scheduler: &DdimScheduler,
    first: usize,
    g: Tensor<B, 4>,
    outputs: &[Tensor<B, 4>],
    inputs: &[Tensor<B, 4>],
) -> Tensor<B, 4> {
    (0..first).rev().fold(g, |g, i| {
        scheduler.step_sample_vjp(i, g, outputs[i].clone(), inputs[i].clone())
    })
}

/// `loss.backward()`, also when the loss is untracked (a reward that ignores or detaches the images: burn panics
/// on the backward of a tensor without a graph): a zero leaf is added, so the gradients exist and the latents'
/// gradient is simply absent ([`ChainError::LossIgnoresImages`]).
pub(crate) fn backward_tracked<B: AutodiffBackend>(loss: Tensor<B, 1>) -> B::Gradients {
    let anchor = Tensor::<B, 1>::zeros([1], (&loss.device(), loss.dtype())).require_grad();
    (loss + anchor).backward()
}

/// The (constant) conditioning on the autodiff backend.
pub(crate) fn autodiff_text<B: AutodiffBackend>(
    text: &Conditioning<B::InnerBackend>,
) -> Conditioning<B> {
    Conditioning::from_inner(text)
}

pub(crate) fn scalar<B: burn::tensor::backend::Backend>(t: Tensor<B, 1>) -> f64 {
    f64_values(t)[0]
}

pub(crate) fn f64_values<B: burn::tensor::backend::Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("f64 values")
}

/// Puts `x` and every trainable LoRA matrix of `unet` into one burn-autodiff graph, by one operation that has them
/// all as parents (a concatenation of one value of each, dropped unused: no gradient flows through it).
///
/// Why: burn-autodiff 0.21 starts a graph for each tensor that requires a gradient and merges graphs when an
/// operation joins them, into one chosen by hash order; the merged graph's origin (here a LoRA matrix's node id) is
/// pointed at the surviving graph but not registered with it, so once that graph is merged in turn, the matrix's
/// id points at an emptied graph and every later product with it merges again, half the time moving the whole
/// trajectory's graph (28% of `scale/k20_nockpt`'s samples, growing with the kept steps). Joined in a single merge
/// before the first step, while each matrix is still the origin of its own graph (fresh tensors, as after every
/// optimiser step), no later operation meets two graphs: `scale/k20_nockpt` 15.6 -> 8.3 s (AMD EPYC, 2 threads;
/// BENCHMARKS.md, 2026-12-07 midday). Matrices already used in an earlier graph keep their stale entries (a cost in
/// time only).
fn join_graphs<B: AutodiffBackend>(unet: &UNet2DConditionModel<B>, x: &Tensor<B, 4>) {
    let one = |t: Tensor<B, 1>| t.slice([0..1]).cast(x.dtype());
    let mut parts = vec![one(x.clone().flatten(0, 3))];
    for (_, l) in adapters(unet) {
        for p in [l.down.val(), l.up.val()] {
            if p.is_require_grad() && p.dims()[0] * p.dims()[1] > 0 {
                parts.push(one(p.flatten(0, 1)));
            }
        }
    }
    drop(Tensor::cat(parts, 0));
}

/// The same trajectory differentiated the plain way: the autodiff graph of every kept step is built during the
/// forward pass and freed only after one backward. Memory grows linearly with the number of kept steps; kept for
/// comparison (tests, benchmarks) with the checkpointed [`trajectory`], whose output it returns in full.
/// The LoRA matrices and the first kept latent are joined into one autodiff graph before the first kept step (a
/// workaround for burn-autodiff 0.21's graph merging, which otherwise grows faster than linearly with the graph).
pub fn trajectory_full_graph<B, F>(
    input: TrajectoryInput<'_, B, F>,
) -> Result<TrajectoryOutput<B>, ChainError>
where
    B: AutodiffBackend,
    F: Fn(Tensor<B, 4>) -> Result<(Tensor<B, 1>, Tensor<B, 1>), RewardError>,
{
    check_inputs(&input)?;
    let (unet, scheduler, text, guidance) =
        (input.unet, input.scheduler, input.text, input.guidance);
    let (noises, grad_steps) = (input.noises, input.grad_steps);
    let n = scheduler.timesteps().len();
    let inner_unet = unet.valid();
    let text_ad = autodiff_text::<B>(text);
    // The graph starts at the input of the first kept step (as before it, nothing carries gradient); its latent
    // gradient is carried on to x_T like the checkpointed backward does.
    let first = first_kept(grad_steps);
    let mut x = Tensor::<B, 4>::from_inner(input.x_t);
    let mut x_first = None;
    let (mut outputs, mut inputs) = (Vec::new(), Vec::new());
    for i in 0..n {
        if i == first {
            x = x.require_grad();
            x_first = Some(x.clone());
            join_graphs(unet, &x);
        }
        let t = scheduler.timesteps()[i] as f64;
        let eps = if grad_steps[i] {
            guided_noise(unet, x.clone(), t, &text_ad, guidance)
        } else {
            let eps = guided_noise(&inner_unet, x.clone().inner(), t, text, guidance);
            if i < first {
                outputs.push(eps.clone());
                inputs.push(x.clone().inner());
            }
            Tensor::from_inner(eps)
        };
        let z = noises.get(i).cloned().flatten().map(Tensor::from_inner);
        x = scheduler.step(eps, i, x, z).prev_sample;
    }
    let x_first = match x_first {
        Some(x_first) => x_first,
        None => {
            x = x.require_grad();
            x.clone()
        }
    };
    let final_latents = x.clone().inner();
    let images = input.vae.decode_scaled(x);
    let (loss, scores) = (input.loss_fn)(images.clone())?;
    let value = scalar(loss.clone().inner());
    let scores = f64_values(scores.inner());
    let images = images.inner();
    let grads = backward_tracked(loss);
    let g = x_first
        .grad(&grads)
        .ok_or(ChainError::LossIgnoresImages)?
        .cast(carry_dtype(final_latents.dtype()));
    Ok(TrajectoryOutput {
        loss: value,
        scores,
        final_latents,
        images,
        grads: lora_grads_from(unet, &grads),
        latent_grad: carry_to_noise(scheduler, first, g, &outputs, &inputs).cast(DType::F32),
        copy_scores: Vec::new(),
    })
}
