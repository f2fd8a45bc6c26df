//! Checks that more than one sampling parity module runs against its fixture's `sample.safetensors` references.

use alignprop_io::weights::SafetensorsSource;
use alignprop_pipeline::StableDiffusion;
use alignprop_schedulers::StepOutput;
use alignprop_testing::{assert_close, ref_int_on};
use burn::tensor::{Tensor, backend::Backend};

/// The fixtures' prompts in batch order: two empty negatives, then the two prompts.
pub const PROMPT_BATCH: [&str; 4] = ["", "", "cat", "a photo of a golden retriever"];

/// The tokenizer's ids of [`PROMPT_BATCH`] equal `input_ids` of `refs` (`[4, 77]`).
pub fn assert_prompt_ids<B: Backend>(sd: &StableDiffusion<B>, refs: &SafetensorsSource) {
    let expected = ref_int_on::<B, 2>(refs, "input_ids", &Default::default());
    let ours = sd
        .tokenizer
        .input_ids::<B, _>(&PROMPT_BATCH, &Default::default())
        .unwrap();
    assert_eq!(
        ours.into_data().convert::<i64>(),
        expected.into_data().convert::<i64>()
    );
}

/// Step `i`'s DDIM update against `step{i}.pred_original_sample` and `step{i}.prev_sample` (`t` reads a
/// reference `[batch, channels, height, width]`); returns the new latents.
pub fn assert_ddim_update<B: Backend>(
    i: usize,
    out: StepOutput<B>,
    t: impl Fn(&str) -> Tensor<B, 4>,
    tol: f64,
) -> Tensor<B, 4> {
    for (name, ours) in [
        ("pred_original_sample", out.pred_original_sample),
        ("prev_sample", out.prev_sample.clone()),
    ] {
        let key = format!("step{i}.{name}");
        assert_close(&key, ours, t(&key), tol);
    }
    out.prev_sample
}
