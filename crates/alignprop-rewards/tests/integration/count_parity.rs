//! The object count (OWL-ViT) against transformers' `OwlViTForObjectDetection` (`tests/fixtures/tiny-count`, made by
//! `xtask/fixtures/make_count_refs.py`): query token ids, the detector's input, the normalised query embeddings,
//! the logits of 2 images x 2 queries, each image's soft count for its own object and its gradient with respect to
//! the image, in f32 and f64; the hard counts of transformers' post-processing at two thresholds; the prompt path
//! ("three cats" counts cats with target 3) and its errors.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use alignprop_io::weights::SafetensorsSource;
use alignprop_rewards::count::ObjectCount;
use alignprop_rewards::owlvit::OwlViTDetector;
use alignprop_rewards::{Reward, RewardError};
use alignprop_testing::prompt_reward::{tiny_count, write_count_model};
use alignprop_testing::{ref_int_on, ref_tensor_on, ref_values, values};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};

type I = burn::backend::Flex;
type A = Autodiff<I>;

fn refs() -> SafetensorsSource {
    SafetensorsSource::open(&[tiny_count().join("refs.safetensors")]).unwrap()
}

/// The two object queries of the references.
fn queries() -> Vec<String> {
    serde_json::from_str(&refs().metadata()["queries"]).unwrap()
}

/// The detector folder written in a fresh temporary folder (removed when dropped).
struct Folder(PathBuf);

impl Drop for Folder {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn folder() -> Folder {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "alignprop-count-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    write_count_model(&d).unwrap();
    Folder(d)
}

fn detector<B: Backend>(f: &Folder, dtype: DType) -> OwlViTDetector<B> {
    OwlViTDetector::load(&f.0, None, &f.0, &Default::default(), dtype).unwrap()
}

fn counter<B: Backend>(
    f: &Folder,
    object: Option<&str>,
    threshold: f64,
    dtype: DType,
) -> ObjectCount<B> {
    ObjectCount::new(detector(f, dtype), object, threshold).unwrap()
}

fn err(a: &[f64], e: &[f64]) -> f64 {
    alignprop_testing::rel_err_values(a, e).0
}

/// Prompts whose count and object give the reference queries: image 0 counts cats (target 3), image 1 dogs (2).
fn prompts() -> Vec<String> {
    vec!["Three cats on a sofa".into(), "a photo of 2 dogs".into()]
}

#[test]
fn query_ids_match_the_owlvit_tokenizer() {
    let f = folder();
    let det = detector::<I>(&f, DType::F32);
    assert_eq!(det.max_length, 16);
    assert_eq!(det.tokenizer.pad_id(), 0, "OWL-ViT pads with '!'");
    let d = Default::default();
    let ids = det.query_ids("count", &queries(), &d).unwrap();
    let want: Tensor<I, 2, Int> = ref_int_on(&refs(), "input_ids", &d);
    assert_eq!(ids.into_data(), want.into_data());
}

#[test]
fn logits_counts_and_image_gradients_match_transformers() {
    let r = refs();
    let d = Default::default();
    let f = folder();
    // f64 to 1e-12: measured 9e-16 for the gradient; a scalar rounded to f32 anywhere on the path (burn-autodiff
    // 0.21's div_scalar backward did, through LayerNorm's mean over 40 features) shows as ~3e-9.
    for (dtype, sfx, tol) in [(DType::F32, "", 1e-4), (DType::F64, "_f64", 1e-12)] {
        let count = counter::<A>(&f, None, 0.5, dtype);
        let det = &count.detector;
        let image: Tensor<A, 4> = ref_tensor_on(&r, "image", &d, dtype);
        let px = det.preprocess(image.clone());
        let e_px = err(
            &values(px.inner()),
            &ref_values(&r, &format!("pixel_values{sfx}")),
        );
        let q = det.query_embeds(det.query_ids("count", &queries(), &d).unwrap());
        let e_q = err(
            &values(q.clone().inner()),
            &ref_values(&r, &format!("query_embeds{sfx}")),
        );
        let logits = det.logits(image.clone(), q.unsqueeze::<3>().repeat_dim(0, 2));
        assert_eq!(logits.dims(), [2, 16, 2]);
        let e_logits = err(
            &values(logits.inner()),
            &ref_values(&r, &format!("logits{sfx}")),
        );

        // The prompt path: image 0 counts cats, image 1 dogs, with the targets 3 and 2 of the prompts.
        let image = image.require_grad();
        let (counts, loss) = count.score_and_loss(image.clone(), &prompts()).unwrap();
        let want = ref_values(&r, &format!("counts{sfx}"));
        let got = values(counts.clone().inner());
        let e_counts = err(&got, &want);
        let l = values(loss.inner());
        assert!(
            (l[0] - (got[0] - 3.0).abs()).abs() < 1e-9
                && (l[1] - (got[1] - 2.0).abs()).abs() < 1e-9,
            "loss {l:?} for counts {got:?}"
        );
        let grads = counts.sum().backward();
        let g = image.grad(&grads).unwrap();
        let e_grad = err(&values(g), &ref_values(&r, &format!("grad_image{sfx}")));
        eprintln!(
            "{dtype:?}: pixel_values {e_px:.2e}, query embeds {e_q:.2e}, logits {e_logits:.2e}, counts {e_counts:.2e} \
             ({got:?}), image gradient {e_grad:.2e}"
        );
        for (what, e) in [
            ("pixel_values", e_px),
            ("query embeds", e_q),
            ("logits", e_logits),
            ("counts", e_counts),
            ("image gradient", e_grad),
        ] {
            assert!(
                e < tol,
                "{dtype:?} {what}: relative error {e:.2e} > {tol:.0e}"
            );
        }
    }
}

/// A configured object is the query for every image: image 0's count of "a photo of a cat" is the reference's; the
/// target then comes from `reward.target` (the `Targeted` wrapper) or from a number in the prompt.
#[test]
fn a_configured_object_counts_in_every_image() {
    let r = refs();
    let d = Default::default();
    let f = folder();
    let count = counter::<I>(&f, Some("a photo of a cat"), 0.5, DType::F64);
    let image: Tensor<I, 4> = ref_tensor_on(&r, "image", &d, DType::F64);
    let s = values(count.score(image.clone()).unwrap());
    let want = ref_values(&r, "counts_f64");
    assert!((s[0] - want[0]).abs() < 1e-9 * want[0], "{s:?} vs {want:?}");
    assert!(
        (s[1] - want[1]).abs() > 1e-3,
        "image 1 counted cats, not dogs: {s:?}"
    );
    // Without prompts there is no target: a clear error, not a guess.
    let e = count
        .score_and_loss(image.clone(), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no target count for image 0") && e.contains("reward.target"),
        "{e}"
    );
    let targeted = alignprop_rewards::compose::Targeted {
        inner: Box::new(count),
        target: 4.0,
    };
    let (s2, l) = targeted.score_and_loss(image, &[]).unwrap();
    let (s2, l) = (values(s2), values(l));
    assert_eq!(s2, s);
    assert!((l[0] - (s[0] - 4.0).abs()).abs() < 1e-12, "{l:?}");
}

#[test]
fn hard_counts_match_transformers_post_processing() {
    let r = refs();
    let d = Default::default();
    let f = folder();
    let thresholds: Vec<f64> = serde_json::from_str(&r.metadata()["thresholds"]).unwrap();
    for t in thresholds {
        for dtype in [DType::F32, DType::F64] {
            let count = counter::<I>(&f, None, t, dtype);
            let image: Tensor<I, 4> = ref_tensor_on(&r, "image", &d, dtype);
            let (scores, details) = count.score_with_details(image, &prompts()).unwrap();
            let want = ref_values(&r, &format!("hard_counts_{t}"));
            assert_eq!(details[0].0, format!("hard_count@{t}"));
            assert_eq!(details[0].1, want, "{dtype:?} threshold {t}");
            assert_eq!(details[1], ("target".to_string(), vec![3.0, 2.0]));
            assert_eq!(scores.dims(), [2]);
        }
    }
}

#[test]
fn prompts_without_a_count_or_object_are_clear_errors() {
    let r = refs();
    let d = Default::default();
    let f = folder();
    let count = counter::<I>(&f, None, 0.1, DType::F32);
    let image: Tensor<I, 4> = ref_tensor_on(&r, "image", &d, DType::F32);
    match count.score(image.clone()) {
        Err(RewardError::MissingPrompts {
            images: 2,
            prompts: 0,
            ..
        }) => {}
        other => panic!("expected MissingPrompts, got {other:?}"),
    }
    let e = count
        .score_with_prompts(image, &["three cats".into(), "a cat on a mat".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("count: ") && e.contains("\"a cat on a mat\"") && e.contains("reward.object"),
        "{e}"
    );
}

/// The count is a term of a weighted sum like any reward: the sum's loss adds the count's own per-image loss
/// (`|count - target|`, targets from the prompts) and the other term's, with their weights.
#[test]
fn the_count_is_a_term_of_a_weighted_sum() {
    use alignprop_rewards::Brightness;
    use alignprop_rewards::compose::{WeightedSum, WeightedTerm};
    let r = refs();
    let d = Default::default();
    let f = folder();
    let image: Tensor<I, 4> = ref_tensor_on(&r, "image", &d, DType::F64);
    let count = counter::<I>(&f, None, 0.1, DType::F64);
    let (c, cl) = count.score_and_loss(image.clone(), &prompts()).unwrap();
    let (b, bl) = Brightness
        .score_and_loss(image.clone(), &prompts())
        .unwrap();
    let sum = WeightedSum::new(vec![
        WeightedTerm {
            weight: 0.5,
            reward: Box::new(count),
        },
        WeightedTerm {
            weight: 2.0,
            reward: Box::new(Brightness),
        },
    ]);
    let (s, l) = sum.score_and_loss(image, &prompts()).unwrap();
    let want_s: Vec<f64> = values(c * 0.5 + b * 2.0);
    let want_l: Vec<f64> = values(cl * 0.5 + bl * 2.0);
    assert!(err(&values(s), &want_s) < 1e-14 && err(&values(l), &want_l) < 1e-14);
}
