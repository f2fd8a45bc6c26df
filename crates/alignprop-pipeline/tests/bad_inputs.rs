//! Bad-input corpus for the image reader ([`load_image`]): files that are no image, truncated PNGs and PNGs
//! claiming huge sizes give a one-line `Err` naming the file, never a panic or an allocation of the claimed size.

use std::path::{Path, PathBuf};

use alignprop_pipeline::images::load_image;
use alignprop_testing::alloc::{Counting, peak_during};
use burn::backend::Flex;
use image::{Rgb, RgbImage};

#[global_allocator]
static GLOBAL: Counting = Counting;

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("alignprop-pipeline-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// CRC-32 (IEEE), as PNG chunks store it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = temp_dir("images-bad").join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A valid 4x3 PNG.
fn png() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    RgbImage::from_pixel(4, 3, Rgb([10, 200, 30]))
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn image_error(path: &Path, what: &str) {
    let mut result = None;
    let peak = peak_during(|| result = Some(load_image::<Flex>(path, &Default::default())));
    let msg = result
        .unwrap()
        .err()
        .unwrap_or_else(|| panic!("{}: read without error", path.display()));
    assert!(!msg.contains('\n'), "message is not one line: {msg:?}");
    assert!(
        msg.contains(&format!("{}: cannot read image", path.display())),
        "{msg}"
    );
    assert!(msg.contains(what), "message {msg:?} does not say {what:?}");
    assert!(
        peak < 16 << 20,
        "{}: {peak} bytes allocated",
        path.display()
    );
}

#[test]
fn valid_png_reads() {
    let path = file("ok.png", &png());
    assert_eq!(
        load_image::<Flex>(&path, &Default::default())
            .unwrap()
            .dims(),
        [1, 3, 3, 4]
    );
    // The format comes from the content, not the name.
    let path = file("png_named.jpg", &png());
    assert_eq!(
        load_image::<Flex>(&path, &Default::default())
            .unwrap()
            .dims(),
        [1, 3, 3, 4]
    );
}

#[test]
fn not_pngs() {
    image_error(
        &file("text.png", b"hello, this is text and not a picture"),
        "",
    );
    image_error(&file("empty.png", b""), "");
    let p = png();
    image_error(&file("truncated.png", &p[..p.len() / 2]), "");
    image_error(&file("header_only.png", &p[..8]), "");
    let path = temp_dir("images-bad").join("missing.png");
    image_error(&path, "No such file");
}

#[test]
fn png_claiming_a_huge_size_is_refused_before_allocating() {
    for (name, w, h) in [
        ("wide.png", 1u32 << 30, 1u32),
        ("big.png", 60_000, 60_000),
        ("just_over.png", 8193, 8),
    ] {
        let mut p = png();
        // IHDR: length(4) "IHDR"(4) width(4) height(4) ... crc(4), right after the 8-byte signature.
        p[16..20].copy_from_slice(&w.to_be_bytes());
        p[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32(&p[12..29]);
        p[29..33].copy_from_slice(&crc.to_be_bytes());
        image_error(&file(name, &p), "");
    }
}
