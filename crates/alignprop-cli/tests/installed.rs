//! The `alignprop` binary as `cargo install` leaves it: copied out of the build tree and run from an empty
//! folder, with its built-in assets (demo model, SD1.5 tokenizer, preset configs) written to `$ALIGNPROP_HOME`.
//! Nothing here may reach the source tree.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh folder holding a copy of the binary (`bin/alignprop`), an empty working folder (`work/`) and the
/// assets folder (`home/`).
struct Install {
    root: PathBuf,
}

impl Install {
    fn new(name: &str) -> Self {
        let root =
            std::env::temp_dir().join(format!("alignprop-installed-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["bin", "work", "home"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy(env!("CARGO_BIN_EXE_alignprop"), root.join("bin/alignprop")).unwrap();
        Install { root }
    }

    fn work(&self) -> PathBuf {
        self.root.join("work")
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(self.root.join("bin/alignprop"))
            .args(args)
            .current_dir(self.work())
            .env("ALIGNPROP_HOME", self.root.join("home"))
            .env("HOME", self.root.join("home"))
            .env_remove("XDG_CACHE_HOME")
            .output()
            .expect("run the copied alignprop")
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn png_size(p: &Path) -> (u32, u32) {
    let img = image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (img.width(), img.height())
}

/// The demo without `--config` (shortened with `--set`), sampling without `--model`, and a preset by its repository
/// path from a folder that has no `configs/`: all work from the embedded assets.
#[test]
fn the_copied_binary_runs_the_demo_and_the_presets_from_an_empty_folder() {
    let i = Install::new("demo");
    let out = i.run(&[
        "train",
        "--set",
        "train.steps=2",
        "--set",
        "sampling.steps=2",
        "--set",
        "truncation.k=1",
        "--set",
        "eval.every=1",
        "--set",
        "output.save_every=2",
    ]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("built-in CPU demo"), "{err}");
    let run = i.work().join("runs/tiny_demo");
    for f in [
        "pytorch_lora_weights.safetensors",
        "metrics.jsonl",
        "eval.jsonl",
        "reward_curve.png",
        "before_after.png",
    ] {
        assert!(run.join(f).is_file(), "{f} missing; stderr: {err}");
    }
    // Two grids (step 0 and step 2) under their header lines.
    let (gw, gh) = png_size(&run.join("eval_00000.png"));
    let (bw, bh) = png_size(&run.join("before_after.png"));
    assert!(
        bw >= gw && bh > 2 * gh,
        "before_after {bw}x{bh}, grid {gw}x{gh}"
    );
    // The assets went to ALIGNPROP_HOME, in the repository's layout.
    let home = std::fs::read_dir(i.root.join("home"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("builtin-")
        })
        .expect("a builtin-<version> folder in ALIGNPROP_HOME");
    assert!(home.join("models/tiny-shapes/unet/config.json").is_file());
    assert!(
        home.join("models/tiny-shapes/tokenizer/vocab.json")
            .is_file()
    );
    assert!(home.join("configs/aesthetic.toml").is_file());

    // `sample` without --model: the demo model.
    let out = i.run(&[
        "sample",
        "--prompt",
        "two red squares on a blue background",
        "--steps",
        "2",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--out",
        "pictures",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let pngs: Vec<_> = std::fs::read_dir(i.work().join("pictures"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    assert!(!pngs.is_empty(), "no picture written");

    // A preset by its repository path, from a folder without configs/: the embedded preset is used, and fails on
    // its model path (the user's SD1.5 download), naming it.
    let out = i.run(&[
        "train",
        "--config",
        "configs/aesthetic.toml",
        "--device",
        "cpu",
    ]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("built-in preset 'aesthetic'"), "{err}");
    assert!(err.contains("/models/stable-diffusion-v1-5"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // An unknown config: one line naming it and the presets.
    let out = i.run(&["train", "--config", "nonesuch.toml"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("nonesuch.toml") && err.contains("tiny_demo, aesthetic"),
        "{err}"
    );
}
