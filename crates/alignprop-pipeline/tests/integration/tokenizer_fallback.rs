//! A model folder without `tokenizer/` loads with SD1.5's bundled tokenizer, which is the tiny fixture's own.

use std::path::{Path, PathBuf};

use alignprop_pipeline::StableDiffusion;
use alignprop_testing::tiny_sd;
use burn::tensor::{DType, Int, Tensor};

type B = burn::backend::Flex;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// The tiny fixture's model folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `scheduler/`) without
/// its `tokenizer/`.
fn tiny_sd_without_tokenizer() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-sd-no-tokenizer");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        tiny_sd().join("model_index.json"),
        dir.join("model_index.json"),
    )
    .unwrap();
    for part in ["unet", "vae", "text_encoder", "scheduler"] {
        copy_dir(&tiny_sd().join(part), &dir.join(part));
    }
    assert!(!dir.join("tokenizer").exists());
    dir
}

#[test]
fn folder_without_tokenizer_loads_and_tokenizes_as_with_it() {
    let device = Default::default();
    let with = StableDiffusion::<B>::load(tiny_sd(), &device, DType::F32).unwrap();
    assert!(with.tokenizer_note.is_none());
    let dir = tiny_sd_without_tokenizer();
    let without = StableDiffusion::<B>::load(&dir, &device, DType::F32).unwrap();
    let note = without
        .tokenizer_note
        .as_deref()
        .expect("a note about the tokenizer");
    assert!(
        note.contains("tokenizer") && note.contains("SD1.5"),
        "{note}"
    );
    eprintln!("{note}");

    let (a, b) = (&with.tokenizer, &without.tokenizer);
    assert_eq!(
        (
            a.bos_id(),
            a.eos_id(),
            a.pad_id(),
            a.max_length(),
            a.vocab_size()
        ),
        (
            b.bos_id(),
            b.eos_id(),
            b.pad_id(),
            b.max_length(),
            b.vocab_size()
        )
    );
    // The prompts of the tokenizer reference (`refs/tokenizer.json`: punctuation, unicode, truncation, ...) and a
    // few more.
    #[derive(serde::Deserialize)]
    struct Prompt {
        prompt: String,
    }
    #[derive(serde::Deserialize)]
    struct Refs {
        prompts: Vec<Prompt>,
    }
    let refs: Refs =
        alignprop_io::pipeline_files::read_json(&tiny_sd().join("refs/tokenizer.json")).unwrap();
    let long = "a very long prompt that goes on and on ".repeat(12);
    let mut prompts: Vec<&str> = refs.prompts.iter().map(|p| p.prompt.as_str()).collect();
    assert_eq!(prompts.len(), 15);
    prompts.extend([
        "",
        "cat",
        "A  PHOTO of an astronaut riding a horse on Mars, 4k, trending on artstation!!",
        "naïve café déjà-vu 123 don't we'll",
        &long,
    ]);
    for &p in &prompts {
        assert_eq!(a.tokenize(p).unwrap(), b.tokenize(p).unwrap(), "{p:?}");
        assert_eq!(a.encode(p).unwrap(), b.encode(p).unwrap(), "{p:?}");
    }
    let ids = |sd: &StableDiffusion<B>| -> Vec<i64> {
        let t: Tensor<B, 2, Int> = sd.tokenizer.input_ids(&prompts, &device).unwrap();
        t.into_data().convert::<i64>().to_vec().unwrap()
    };
    assert_eq!(ids(&with), ids(&without));
    // Same conditioning through the (identical) text encoders.
    let states = |sd: &StableDiffusion<B>| -> Vec<f32> {
        sd.encode_prompts(&["", "cat", "a photo of a golden retriever"])
            .unwrap()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap()
    };
    assert_eq!(states(&with), states(&without));
}
