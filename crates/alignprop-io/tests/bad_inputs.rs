//! Bad-input corpus for the weight readers: each malformed safetensors or `.pth` file must give an `Err` whose
//! message is one line naming the file and what is wrong (expected and found where there are such), never a panic
//! or a hang, and a file whose header lies about its sizes must not make the reader allocate what it claims.

mod common;

use std::path::{Path, PathBuf};

use alignprop_io::pth::PthSource;
use alignprop_io::weights::{SafetensorsSource, TensorSource, VarBuilder};
use alignprop_testing::alloc::{Counting, peak_on_this_thread_during};
use burn::backend::Flex;
use burn::tensor::DType;
use common::*;

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Writes `bytes` as `name` in this test's folder.
fn file(test: &str, name: &str, bytes: &[u8]) -> PathBuf {
    let path = temp_dir(test).join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Checks an error message: one line, naming the file, saying `what`.
fn check_message(msg: &str, path: &Path, what: &str) {
    assert!(!msg.contains('\n'), "message is not one line: {msg:?}");
    assert!(
        msg.contains(&path.display().to_string()),
        "message does not name {}: {msg}",
        path.display()
    );
    assert!(msg.contains(what), "message {msg:?} does not say {what:?}");
}

/// Opens `bytes` as a safetensors file and reads every tensor; returns the error message.
fn safetensors_error(name: &str, bytes: &[u8], what: &str) {
    let path = file("st", name, bytes);
    let result = SafetensorsSource::open(&[&path]).and_then(|src| {
        for k in src.keys() {
            src.find(&k)?;
        }
        Ok(())
    });
    let msg = result
        .err()
        .unwrap_or_else(|| panic!("{name}: read without error"))
        .to_string();
    check_message(&msg, &path, what);
}

/// Two float tensors, `w` F32 [2, 3] and `b` F32 [3], with the header `header` given their entries.
fn two(w: &str, b: &str) -> Vec<u8> {
    safetensors(
        &format!(r#"{{"w":{w},"b":{b}}}"#),
        &f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8., 9.]),
    )
}

const W: &str = r#"{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}"#;
const B: &str = r#"{"dtype":"F32","shape":[3],"data_offsets":[24,36]}"#;

#[test]
fn valid_safetensors_reads() {
    let path = file("st", "valid.safetensors", &two(W, B));
    let src = SafetensorsSource::open(&[&path]).unwrap();
    assert_eq!(src.keys(), ["b", "w"]);
    assert_eq!(src.shape("w"), Some(vec![2, 3]));
}

#[test]
fn truncated_safetensors() {
    let whole = two(W, B);
    safetensors_error(
        "empty.safetensors",
        &[],
        "file is 0 bytes, expected at least the 8-byte",
    );
    safetensors_error("cut_in_length.safetensors", &whole[..5], "file is 5 bytes");
    safetensors_error(
        "cut_in_header.safetensors",
        &whole[..30],
        "exceeds the 22 bytes that follow",
    );
    safetensors_error(
        "cut_in_data.safetensors",
        &whole[..whole.len() - 10],
        "end past the data section (26 bytes)",
    );
}

#[test]
fn lying_safetensors_headers() {
    let mut long = two(W, B);
    long[..8].copy_from_slice(&1_000_000u64.to_le_bytes());
    safetensors_error(
        "length_past_end.safetensors",
        &long,
        "header length 1000000",
    );
    long[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    safetensors_error(
        "length_max.safetensors",
        &long,
        "header length 18446744073709551615",
    );
    safetensors_error(
        "offsets_past_end.safetensors",
        &two(W, r#"{"dtype":"F32","shape":[3],"data_offsets":[24,1000]}"#),
        "data_offsets [24, 1000] end past the data section (36 bytes)",
    );
    safetensors_error(
        "offsets_reversed.safetensors",
        &two(W, r#"{"dtype":"F32","shape":[3],"data_offsets":[36,24]}"#),
        "data_offsets [36, 24] are reversed",
    );
    safetensors_error(
        "offsets_overlap.safetensors",
        &safetensors(
            &format!(
                r#"{{"w":{W},"b":{{"dtype":"F32","shape":[3],"data_offsets":[12,24]}},"c":{{"dtype":"F32","shape":[3],"data_offsets":[24,36]}}}}"#
            ),
            &[0; 36],
        ),
        "overlap",
    );
    safetensors_error(
        "offsets_gap.safetensors",
        &safetensors(
            &format!(r#"{{"w":{W},"b":{{"dtype":"F32","shape":[2],"data_offsets":[28,36]}}}}"#),
            &[0; 36],
        ),
        "4 unused bytes between tensors",
    );
    safetensors_error(
        "offsets_vs_shape.safetensors",
        &two(r#"{"dtype":"F32","shape":[2,4],"data_offsets":[0,24]}"#, B),
        "tensor 'w': F32 [2, 4] needs 32 bytes, but data_offsets [0, 24] hold 24",
    );
    safetensors_error(
        "data_not_covered.safetensors",
        &safetensors(&format!(r#"{{"w":{W}}}"#), &[0; 36]),
        "the tensors cover 24 bytes, but the data section holds 36",
    );
    safetensors_error(
        "no_shape.safetensors",
        &two(r#"{"dtype":"F32","data_offsets":[0,24]}"#, B),
        "tensor 'w': no 'shape'",
    );
    safetensors_error(
        "negative_shape.safetensors",
        &two(r#"{"dtype":"F32","shape":[-2,3],"data_offsets":[0,24]}"#, B),
        "tensor 'w': shape [-2,3], expected a list of non-negative integers",
    );
    safetensors_error(
        "not_json.safetensors",
        &safetensors("{\"w\":", &[]),
        "header is not valid JSON",
    );
    safetensors_error(
        "not_object.safetensors",
        &safetensors("[1, 2]", &[]),
        "expected an object",
    );
    safetensors_error(
        "not_utf8.safetensors",
        &safetensors("{\"\u{0}\"}", &[]),
        "header is not valid JSON",
    );
    let mut bad_utf8 = safetensors("{\"xx\":1}", &[]);
    bad_utf8[10] = 0xff;
    safetensors_error("not_utf8b.safetensors", &bad_utf8, "header is not UTF-8");
    safetensors_error(
        "metadata_not_strings.safetensors",
        &safetensors(r#"{"__metadata__":{"format":1}}"#, &[]),
        "'__metadata__' is an object, expected an object of strings",
    );
}

#[test]
fn wrong_safetensors_dtypes() {
    safetensors_error(
        "unknown_dtype.safetensors",
        &two(r#"{"dtype":"F33","shape":[2,3],"data_offsets":[0,24]}"#, B),
        "tensor 'w': unknown dtype \"F33\"",
    );
    // Integer tensors are stored fine, but a model's float parameter cannot be one.
    for (dtype, bytes) in [("I32", 24), ("U8", 6)] {
        let name = format!("int_{dtype}.safetensors");
        let header =
            format!(r#"{{"w":{{"dtype":"{dtype}","shape":[2,3],"data_offsets":[0,{bytes}]}}}}"#);
        let path = file("st", &name, &safetensors(&header, &vec![1; bytes]));
        let vb = VarBuilder::<Flex>::from_safetensors(&[&path], &Default::default(), DType::F32)
            .unwrap();
        let msg = vb
            .get([2, 3], "w", alignprop_io::Init::Zeros)
            .unwrap_err()
            .to_string();
        check_message(
            &msg,
            &path,
            &format!("tensor 'w': unsupported dtype {dtype} (supported: F32, F16, BF16, F64)"),
        );
    }
    // A dtype burn has no element for (FP8) is reported when read.
    let path = file(
        "st",
        "fp8.safetensors",
        &safetensors(
            r#"{"w":{"dtype":"F8_E4M3","shape":[2,3],"data_offsets":[0,6]}}"#,
            &[0; 6],
        ),
    );
    let src = SafetensorsSource::open(&[&path]).unwrap();
    check_message(
        &src.find("w").err().unwrap().to_string(),
        &path,
        "unsupported dtype F8_E4M3",
    );
}

/// NaN-filled tensors are read as stored: the safetensors reader checks the format, not the values (documented in
/// `alignprop_io::weights`; the LoRA reader refuses non-finite adapters, see alignprop-lora's bad-input tests).
#[test]
fn nan_tensors_read_as_stored() {
    let header = r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
    let path = file(
        "st",
        "nan.safetensors",
        &safetensors(header, &f32_bytes(&[f32::NAN; 6])),
    );
    let vb =
        VarBuilder::<Flex>::from_safetensors(&[&path], &Default::default(), DType::F32).unwrap();
    let t = vb.get([2, 3], "w", alignprop_io::Init::Zeros).unwrap();
    let v = t.into_data().to_vec::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_nan()));
}

#[test]
fn oversized_safetensors_shapes_do_not_allocate() {
    let cases = [
        (
            "overflow.safetensors",
            format!(
                r#"{{"dtype":"F32","shape":[{0},{0}],"data_offsets":[0,24]}}"#,
                1u64 << 40
            ),
            "is larger than any file (its size overflows)",
        ),
        (
            "huge.safetensors",
            format!(
                r#"{{"dtype":"F32","shape":[{}],"data_offsets":[0,24]}}"#,
                1u64 << 40
            ),
            "needs 4398046511104 bytes, but data_offsets [0, 24] hold 24",
        ),
        (
            "huge_offsets.safetensors",
            format!(
                r#"{{"dtype":"F32","shape":[{}],"data_offsets":[0,{}]}}"#,
                1u64 << 40,
                1u64 << 42
            ),
            "end past the data section",
        ),
        (
            "u64_max.safetensors",
            format!(
                r#"{{"dtype":"F32","shape":[{}],"data_offsets":[0,24]}}"#,
                u64::MAX
            ),
            "tensor 'w'",
        ),
    ];
    for (name, w, what) in cases {
        let bytes = two(&w, B);
        let peak = peak_on_this_thread_during(|| safetensors_error(name, &bytes, what));
        assert!(
            peak < 1 << 20,
            "{name}: {peak} bytes allocated for a {}-byte file",
            bytes.len()
        );
    }
}

/// Opens `bytes` as a `.pth` file; checks the error message.
fn pth_error(name: &str, bytes: &[u8], what: &str) {
    let path = file("pth", name, bytes);
    let peak = peak_on_this_thread_during(|| {
        let msg = PthSource::open(&path)
            .err()
            .unwrap_or_else(|| panic!("{name}: read without error"))
            .to_string();
        check_message(&msg, &path, what);
    });
    assert!(
        peak < 1 << 20,
        "{name}: {peak} bytes allocated for a {}-byte file",
        bytes.len()
    );
}

#[test]
fn valid_pth_reads() {
    let fixture = alignprop_testing::tiny_reward().join("aesthetic/mlp.pth");
    assert!(!PthSource::open(&fixture).unwrap().keys().is_empty());
    let path = file(
        "pth",
        "handmade.pth",
        &torch_zip(&[2, 3], &[1., 2., 3., 4., 5., 6.]),
    );
    let src = PthSource::open(&path).unwrap();
    let w = src.find("w").unwrap().unwrap();
    assert_eq!(w.shape, [2, 3]);
    assert_eq!(w.data.to_vec::<f32>().unwrap(), [1., 2., 3., 4., 5., 6.]);
}

#[test]
fn bad_pth_files() {
    let fixture =
        std::fs::read(alignprop_testing::tiny_reward().join("aesthetic/mlp.pth")).unwrap();
    pth_error(
        "empty.pth",
        &[],
        "expected a zip archive (first bytes 50 4b 03 04), found []",
    );
    pth_error(
        "garbage.pth",
        b"this is not a checkpoint at all",
        "found [74 68 69 73]",
    );
    pth_error(
        "half.pth",
        &fixture[..fixture.len() / 2],
        "no end-of-central-directory record",
    );
    pth_error(
        "cut_end.pth",
        &fixture[..fixture.len() - 10],
        "no end-of-central-directory record",
    );
    let mut lying = fixture.clone();
    let n = lying.len();
    lying[n - 6..n - 2].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
    pth_error("lying_directory.pth", &lying, "central directory at offset");
    pth_error(
        "no_pickle.pth",
        &zip(
            &[("archive/version", b"3\n"), ("archive/data/0", &[0; 8])],
            0,
        ),
        "no data.pkl among the zip's 2 entries (first: archive/version, archive/data/0)",
    );
    pth_error(
        "deflated.pth",
        &zip(&[("archive/data.pkl", b".")], 8),
        "compression method 8, expected 0",
    );
    let pickle = torch_pickle(&[2, 3], 6);
    pth_error(
        "truncated_pickle.pth",
        &zip(&[("archive/data.pkl", &pickle[..pickle.len() - 1])], 0),
        "without STOP",
    );
    pth_error(
        "huge_string.pth",
        &zip(&[("archive/data.pkl", b"\x80\x02X\xf0\xff\xff\xffabc.")], 0),
        "opcode 0x58 at byte 2 needs 4294967280 bytes, only 4 left",
    );
    pth_error(
        "bad_opcode.pth",
        &zip(&[("archive/data.pkl", b"\x80\x02\xff.")], 0),
        "unknown pickle opcode 0xff at byte 2",
    );
    // A pickle that declares a tensor far larger than its storage and the file.
    let big = 1 << 30;
    pth_error(
        "huge_shape.pth",
        &torch_zip(&[big, big], &[0.; 6]),
        "tensor 'w': F32 [1073741824, 1073741824] needs 4611686018427387904 bytes, more than the whole file",
    );
    pth_error(
        "overflow_shape.pth",
        &torch_zip(&[big, big, big], &[0.; 6]),
        "needs more than 2^64 bytes",
    );
    let path = temp_dir("pth").join("missing.pth");
    check_message(
        &PthSource::open(&path).err().unwrap().to_string(),
        &path,
        "cannot read",
    );
}

/// Pickles nested deeper than burn-store's recursive reader can take are refused before it runs (lists in lists,
/// tuples of tuples); the torch state-dict pickle passes.
#[test]
fn deeply_nested_pickles_are_refused() {
    use alignprop_io::pth::{MAX_PICKLE_NESTING, check_pickle};
    let n = 100_000;
    let mut lists = vec![0x80, 2];
    lists.extend(std::iter::repeat_n(b']', n));
    lists.extend(std::iter::repeat_n(b'a', n - 1));
    lists.push(b'.');
    let mut tuples = vec![0x80, 2, b'N'];
    tuples.extend(std::iter::repeat_n(0x85, n));
    tuples.push(b'.');
    let mut marks = vec![0x80, 2];
    for _ in 0..n {
        marks.push(b'(');
    }
    marks.push(b'N');
    marks.extend(std::iter::repeat_n(b't', n));
    marks.push(b'.');
    for (name, p) in [("lists", lists), ("tuples", tuples), ("marks", marks)] {
        let e = check_pickle(&p).expect_err(name);
        assert!(
            e.contains(&format!("nested deeper than {MAX_PICKLE_NESTING}")) && !e.contains('\n'),
            "{name}: {e}"
        );
    }
    check_pickle(&common::torch_pickle(&[2, 3], 6)).expect("a state dict's pickle");
}
