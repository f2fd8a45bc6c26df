//! Bad inputs for the trainer's file readers, called through their public API: prompt files
//! ([`read_prompts`]) with invalid UTF-8 or nothing but blank lines, and the TOML config ([`TrainConfig::from_file`])
//! mutated at random. Each gives `Ok` or an `Err` naming the file, never a panic.

#[path = "../../alignprop-io/tests/common/mod.rs"]
mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use alignprop_trainer::TrainConfig;
use alignprop_trainer::config::read_prompts;
use common::{Rng, mutate_bytes, temp_dir};

fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = temp_dir("trainer-bad").join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn prompt_error(name: &str, bytes: &[u8], what: &str) {
    let path = file(name, bytes);
    let msg = read_prompts(&path).unwrap_err();
    assert!(!msg.contains('\n'), "message is not one line: {msg:?}");
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");
    assert!(msg.contains(what), "message {msg:?} does not say {what:?}");
}

#[test]
fn bad_prompt_files() {
    prompt_error(
        "latin1.txt",
        b"a caf\xe9 at night\n",
        "cannot read prompt file: stream did not contain valid UTF-8",
    );
    prompt_error(
        "blank.txt",
        b"\n   \n\t\n\r\n",
        "the prompt file has no prompts",
    );
    prompt_error(
        "comments.txt",
        b"# only\n#comments\n",
        "the prompt file has no prompts",
    );
    prompt_error("empty.txt", b"", "the prompt file has no prompts");
    let missing = temp_dir("trainer-bad").join("missing.txt");
    assert!(
        read_prompts(&missing)
            .unwrap_err()
            .contains("cannot read prompt file")
    );
    assert_eq!(
        read_prompts(&file("ok.txt", b"\n a cat \r\n\n# c\ndog\n")).unwrap(),
        ["a cat", "dog"]
    );
}

/// The config parser's errors are one line naming the file and the place (`toml`'s own messages carry a source
/// excerpt with a caret line).
#[test]
fn config_errors_are_one_line() {
    let path = file("bad.toml", b"[train]\nsteps = \"twenty\"\n");
    let msg = TrainConfig::from_file(&path).unwrap_err();
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");
    assert!(!msg.contains('\n'), "message is not one line: {msg:?}");
    assert!(msg.contains("line 2, column 9"), "{msg}");
}

/// Seeded mutations of the demo config: parsing and validating never panic (errors name the file).
#[test]
fn mutated_configs_never_panic() {
    let seed = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/tiny_demo.toml"
    ))
    .unwrap();
    let path = temp_dir("trainer-bad").join("mutant.toml");
    let (started, limit) = (Instant::now(), Duration::from_secs(30));
    let (mut tried, mut ok) = (0usize, 0usize);
    let mut rng = Rng(0xc0f1_9);
    while tried < 20_000 && started.elapsed() < limit {
        let case_seed = rng.next();
        let mut case = Rng(case_seed);
        std::fs::write(&path, mutate_bytes(&mut case, &seed)).unwrap();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            TrainConfig::from_file(&path).and_then(|c| c.validate())
        }));
        match outcome {
            Ok(Ok(())) => ok += 1,
            Ok(Err(msg)) => assert!(!msg.is_empty(), "case seed {case_seed}: empty error"),
            Err(_) => panic!("case seed {case_seed} panicked"),
        }
        tried += 1;
    }
    println!(
        "config: {tried} mutated inputs tried in {:.1} s ({ok} accepted)",
        started.elapsed().as_secs_f64()
    );
    assert!(tried >= 200);
}
