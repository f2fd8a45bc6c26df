//! The built-in assets, embedded in the binary: the demo model (`models/tiny-shapes`, a tiny pretrained
//! text-to-image model), the preset configs (`configs/*.toml`) and their prompt lists.
//!
//! An installed `alignprop` has no source tree beside it, so these files are compiled in and written out on first
//! use ([`materialise`]) into a cache folder with the repository's layout (`configs/`, `models/`), where the configs'
//! relative paths (`../models/tiny-shapes`, `prompts/shapes.txt`) hold as they do in the repository. The folder is
//! `$ALIGNPROP_HOME`, else `$XDG_CACHE_HOME/alignprop`, else `~/.cache/alignprop`, else the system's temporary
//! folder, plus `builtin-<version>`. Files are compared with the embedded bytes on every call and rewritten
//! (atomically: a temporary file renamed into place) only where missing or different, so concurrent runs and
//! edited copies are both safe.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Embeds repository files by their repository-relative paths.
macro_rules! embed {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../", $path)) as &[u8])),*]
    };
}

/// The preset configs and the prompt lists they name, by repository path.
pub const CONFIG_FILES: &[(&str, &[u8])] = embed!(
    "configs/tiny_demo.toml",
    "configs/aesthetic.toml",
    "configs/aesthetic_k1.toml",
    "configs/hps.toml",
    "configs/hps_k1.toml",
    "configs/draft_lv_hps.toml",
    "configs/refl_aesthetic.toml",
    "configs/sd21_aesthetic.toml",
    "configs/sdxl_aesthetic.toml",
    "configs/sdxl_hps_k1.toml",
    "configs/prompts/animals.txt",
    "configs/prompts/eval_animals.txt",
    "configs/prompts/shapes.txt",
    "configs/prompts/eval_shapes.txt",
);

/// The demo model (`models/tiny-shapes`, a diffusers folder without `tokenizer/`: [`materialise`] adds SD1.5's
/// tokenizer, bundled with alignprop-diffusion), by repository path.
pub const DEMO_MODEL_FILES: &[(&str, &[u8])] = embed!(
    "models/tiny-shapes/model_index.json",
    "models/tiny-shapes/scheduler/scheduler_config.json",
    "models/tiny-shapes/text_encoder/config.json",
    "models/tiny-shapes/text_encoder/model.safetensors",
    "models/tiny-shapes/unet/config.json",
    "models/tiny-shapes/unet/diffusion_pytorch_model.safetensors",
    "models/tiny-shapes/vae/config.json",
    "models/tiny-shapes/vae/diffusion_pytorch_model.safetensors",
);

/// The demo model's repository path.
pub const DEMO_MODEL: &str = "models/tiny-shapes";
/// The config `alignprop train` runs without `--config`.
pub const DEMO_CONFIG: &str = "configs/tiny_demo.toml";

/// The names of the preset configs (`tiny_demo`, `aesthetic`, ...): what `--config NAME` accepts.
pub fn preset_names() -> Vec<&'static str> {
    CONFIG_FILES
        .iter()
        .filter_map(|(p, _)| p.strip_prefix("configs/")?.strip_suffix(".toml"))
        .collect()
}

/// The folder the built-in assets are written to (see the module doc); not created here.
pub fn home() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let base = var("ALIGNPROP_HOME")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("alignprop")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("alignprop")))
        .unwrap_or_else(|| std::env::temp_dir().join("alignprop"));
    base.join(concat!("builtin-", env!("CARGO_PKG_VERSION")))
}

/// Writes every embedded file that is missing or differs under [`home`]; returns that folder. Done once per
/// process (later calls return the first call's result: the CLI asks for the config and the trainer for the
/// model, and each check reads every file back).
///
/// Errors name the file that could not be written.
pub fn materialise() -> Result<PathBuf, String> {
    static DONE: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    DONE.get_or_init(write_all).clone()
}

fn write_all() -> Result<PathBuf, String> {
    let root = home();
    for (rel, bytes) in CONFIG_FILES.iter().chain(DEMO_MODEL_FILES) {
        write_if_changed(&root.join(rel), bytes)?;
    }
    // SD1.5's tokenizer (bundled with alignprop-diffusion) as the model's `tokenizer/`, so the written model is a
    // complete diffusers folder (diffusers loads it; prompt rewards default to a model's tokenizer folder).
    let tokenizer = root.join(DEMO_MODEL).join("tokenizer");
    for (name, bytes) in alignprop_diffusion::tokenizer::SD15_TOKENIZER_FILES {
        write_if_changed(&tokenizer.join(name), bytes)?;
    }
    Ok(root)
}

/// The built-in demo model's folder, written out first if needed.
pub fn demo_model() -> Result<PathBuf, String> {
    Ok(materialise()?.join(DEMO_MODEL))
}

/// The built-in preset `name` (`tiny_demo`, `aesthetic`, ...; with or without `.toml`), written out first if
/// needed; `None` when there is no such preset.
pub fn preset(name: &str) -> Result<Option<PathBuf>, String> {
    let name = name.strip_suffix(".toml").unwrap_or(name);
    if !preset_names().contains(&name) {
        return Ok(None);
    }
    Ok(Some(
        materialise()?.join("configs").join(format!("{name}.toml")),
    ))
}

fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if std::fs::read(path).is_ok_and(|have| have == bytes) {
        return Ok(());
    }
    let err =
        |e: std::io::Error| format!("{}: cannot write the built-in file: {e}", path.display());
    let dir = path.parent().expect("embedded paths have a folder");
    std::fs::create_dir_all(dir).map_err(err)?;
    // A name of its own per writer, so concurrent first runs never see each other's half-written file.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(
        ".{}.{}-{nanos}.tmp",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file the presets and the demo reach is embedded (a new preset or prompt file must be listed).
    #[test]
    fn the_embedded_files_are_the_repositorys() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut listed: Vec<&str> = CONFIG_FILES.iter().map(|(p, _)| *p).collect();
        listed.sort();
        let mut found = Vec::new();
        for sub in ["configs", "configs/prompts"] {
            for e in std::fs::read_dir(root.join(sub)).unwrap() {
                let p = e.unwrap().path();
                if p.is_file() {
                    found.push(format!(
                        "{sub}/{}",
                        p.file_name().unwrap().to_string_lossy()
                    ));
                }
            }
        }
        found.sort();
        assert_eq!(
            listed, found,
            "CONFIG_FILES must list every file under configs/"
        );
        for (rel, bytes) in CONFIG_FILES.iter().chain(DEMO_MODEL_FILES) {
            assert_eq!(std::fs::read(root.join(rel)).unwrap(), *bytes, "{rel}");
        }
        assert!(preset_names().contains(&"tiny_demo") && preset_names().contains(&"aesthetic"));
    }

    /// Every preset parses as a training config and passes its checks (their files need not exist for that).
    #[test]
    fn every_preset_parses_and_validates() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for name in preset_names() {
            let path = root.join("configs").join(format!("{name}.toml"));
            let cfg = crate::config::TrainConfig::from_file(&path)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(
            preset_names().contains(&"sdxl_aesthetic") && preset_names().contains(&"sdxl_hps_k1")
        );
    }

    /// Written once, rewritten where a copy was changed, never left half-written.
    #[test]
    fn write_if_changed_restores_edited_copies() {
        let dir = std::env::temp_dir().join(format!("alignprop-builtin-{}", std::process::id()));
        let path = dir.join("a/b.txt");
        write_if_changed(&path, b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        std::fs::write(&path, b"edited").unwrap();
        write_if_changed(&path, b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        let names: Vec<_> = std::fs::read_dir(dir.join("a")).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
