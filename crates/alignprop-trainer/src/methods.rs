//! The reward-gradient methods besides AlignProp's truncated chain ([`crate::chain`], which also runs DRaFT-K:
//! a fixed last-K truncation), on the same inputs ([`TrajectoryInput`]; its `grad_steps` are not read here):
//!
//! - [`refl`]: ReFL (Xu et al. 2023, THUDM/ImageReward's `ReFL.py`): the chain runs without gradient up to a stop
//!   step `s`; one guided UNet call at step `s` with gradient; the step's prediction of the clean latent `x_0`
//!   (DDIM's `pred_original_sample`) is decoded and rewarded.
//! - [`draft_lv`]: DRaFT-LV (Clark et al. 2023, arXiv 2309.17400): the whole chain runs without gradient to `x_0`;
//!   then, for each of `n` fresh noises `e_j`, the sample is noised back to the last step's timestep `t`
//!   (`sqrt(a_t) x_0 + sqrt(1 - a_t) e_j`, diffusers' `add_noise`) and denoised by that one step with gradient;
//!   the loss is the mean over the `n` copies (so the gradient is the mean of theirs).
//!
//! Both keep the autodiff graph of exactly one UNet call and one decode at a time: their memory is that of K = 1.

use alignprop_pipeline::guided_noise;
use alignprop_rewards::RewardError;
use alignprop_schedulers::Scheduler;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor};

use crate::chain::{
    ChainError, NoGradRun, TrajectoryInput, TrajectoryOutput, autodiff_text, backward_tracked,
    carry_to_noise, check_noise, f64_values, forward_no_grad, scalar,
};
use crate::lora_params::{LoraGrads, lora_grads_from};

/// ReFL's step: no gradient through steps `0..stop`, the guided UNet call of step `stop` with gradient, its
/// `x_0` prediction decoded and passed to the loss. `latent_grad` is carried back to `x_T` through the earlier
/// steps (model outputs held fixed), as [`crate::chain::trajectory`] does.
pub fn refl<B, F>(
    input: TrajectoryInput<'_, B, F>,
    stop: usize,
) -> Result<TrajectoryOutput<B>, ChainError>
where
    B: AutodiffBackend,
    F: Fn(Tensor<B, 4>) -> Result<(Tensor<B, 1>, Tensor<B, 1>), RewardError>,
{
    check_noise(&input)?;
    let TrajectoryInput {
        unet,
        vae,
        scheduler,
        text,
        guidance,
        x_t,
        noises,
        loss_fn,
        ..
    } = input;
    let n = scheduler.timesteps().len();
    if stop >= n {
        return Err(ChainError::StopStep { stop, steps: n });
    }
    let noise = |i: usize| noises.get(i).cloned().flatten();
    let NoGradRun {
        inputs,
        outputs,
        sample: x,
    } = forward_no_grad(unet, scheduler, text, guidance, x_t, noises, stop);

    let xs = Tensor::<B, 4>::from_inner(x).require_grad();
    let t = scheduler.timesteps()[stop] as f64;
    let eps = guided_noise(unet, xs.clone(), t, &autodiff_text::<B>(text), guidance);
    // Only the x_0 prediction is used; the step's noise (when it takes one) does not enter it.
    let step_noise = noise(stop).map(Tensor::from_inner);
    let x0 = scheduler
        .step(
            eps,
            stop,
            xs.clone(),
            step_noise.or_else(|| Some(xs.zeros_like())),
        )
        .pred_original_sample;
    let images = vae.decode_scaled(x0.clone());
    let (loss, scores) = loss_fn(images.clone())?;
    let loss_value = scalar(loss.clone().inner());
    let scores = f64_values(scores.inner());
    let grads = backward_tracked(loss);
    let g = xs
        .grad(&grads)
        .ok_or(ChainError::LossIgnoresImages)?
        .cast(DType::F32);
    let lora = lora_grads_from(unet, &grads);
    drop(grads);
    Ok(TrajectoryOutput {
        loss: loss_value,
        scores,
        final_latents: x0.inner(),
        images: images.inner(),
        grads: lora,
        latent_grad: carry_to_noise(scheduler, stop, g, &outputs, &inputs),
        copy_scores: Vec::new(),
    })
}

/// DRaFT-LV: the chain without gradient, then one denoising step with gradient from each of `renoise.len()`
/// re-noised copies of its sample (`renoise[j]`: standard normal `[batch, 4, h, w]`); the loss and its gradient
/// are the mean over the copies. The copies' step takes the chain's own last-step noise when it adds noise
/// (eta > 0). `scores` are the per-image means over the copies, `copy_scores[j]` copy `j`'s, `images` the last
/// copy's, `final_latents` the chain's sample; `latent_grad` is zero (the copies start from the detached sample).
pub fn draft_lv<B, F>(
    input: TrajectoryInput<'_, B, F>,
    renoise: &[Tensor<B::InnerBackend, 4>],
) -> Result<TrajectoryOutput<B>, ChainError>
where
    B: AutodiffBackend,
    F: Fn(Tensor<B, 4>) -> Result<(Tensor<B, 1>, Tensor<B, 1>), RewardError>,
{
    check_noise(&input)?;
    if renoise.is_empty() {
        return Err(ChainError::NoCopies);
    }
    let TrajectoryInput {
        unet,
        vae,
        scheduler,
        text,
        guidance,
        x_t,
        noises,
        loss_fn,
        ..
    } = input;
    let n = scheduler.timesteps().len();
    let noise = |i: usize| noises.get(i).cloned().flatten();
    let x = forward_no_grad(unet, scheduler, text, guidance, x_t.clone(), noises, n).sample;

    let last = n - 1;
    let t = scheduler.timesteps()[last];
    let a = scheduler.alphas_cumprod()[t];
    let text_ad = autodiff_text::<B>(text);
    let weight = 1.0 / renoise.len() as f64;
    let mut acc = LoraGrads::default();
    let (mut loss_value, mut copy_scores, mut images) = (0.0, Vec::new(), None);
    for e in renoise {
        let noised = x.clone() * a.sqrt() + e.clone().cast(x.dtype()) * (1.0 - a).sqrt();
        let x1 = Tensor::<B, 4>::from_inner(noised).require_grad();
        let eps = guided_noise(unet, x1.clone(), t as f64, &text_ad, guidance);
        let x0 = scheduler
            .step(eps, last, x1.clone(), noise(last).map(Tensor::from_inner))
            .prev_sample;
        let decoded = vae.decode_scaled(x0);
        let (loss, scores) = loss_fn(decoded.clone())?;
        loss_value += weight * scalar(loss.clone().inner());
        copy_scores.push(f64_values(scores.inner()));
        let grads = backward_tracked(loss * weight);
        if x1.grad(&grads).is_none() {
            return Err(ChainError::LossIgnoresImages);
        }
        acc.add(lora_grads_from(unet, &grads));
        images = Some(decoded.inner());
    }
    let batch = copy_scores[0].len();
    let scores = (0..batch)
        .map(|b| copy_scores.iter().map(|c| c[b]).sum::<f64>() * weight)
        .collect();
    Ok(TrajectoryOutput {
        loss: loss_value,
        scores,
        latent_grad: x_t.zeros_like().cast(DType::F32),
        final_latents: x,
        images: images.expect("at least one copy"),
        grads: acc,
        copy_scores,
    })
}
