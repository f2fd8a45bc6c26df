//! Builders for the bad-input and mutation tests: safetensors bytes from a header, stored zip archives, a minimal
//! torch state-dict pickle, a seeded PRNG and a per-test temporary folder.
#![allow(dead_code)]

use std::path::PathBuf;

/// A temporary folder of this test process, unique per `name`.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("alignprop-io-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A safetensors file: 8-byte little-endian header length, the header, the data.
pub fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// F32 little-endian bytes.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// CRC-32 (IEEE), as zip stores it.
pub fn crc32(data: &[u8]) -> u32 {
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

/// A zip archive of `entries` (name, bytes), each stored with compression `method` (0 = stored).
pub fn zip(entries: &[(&str, &[u8])], method: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let head = |sig: u32, central: bool| {
            let mut h = sig.to_le_bytes().to_vec();
            if central {
                h.extend_from_slice(&20u16.to_le_bytes());
            }
            h.extend_from_slice(&20u16.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(&method.to_le_bytes());
            h.extend_from_slice(&[0; 4]);
            h.extend_from_slice(&crc.to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            if central {
                h.extend_from_slice(&[0; 10]);
                h.extend_from_slice(&offset.to_le_bytes());
            }
            h.extend_from_slice(name.as_bytes());
            h
        };
        out.extend(head(0x0403_4b50, false));
        out.extend_from_slice(data);
        central.extend(head(0x0201_4b50, true));
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// The pickle `torch.save({"w": <float tensor of `shape` over storage "0" of `numel` floats>})` writes
/// (protocol 2). Each dimension is a BININT.
pub fn torch_pickle(shape: &[i32], numel: i32) -> Vec<u8> {
    let mut p = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06J".to_vec();
    p.extend_from_slice(&numel.to_le_bytes());
    p.extend_from_slice(b"tq\x07QK\x00(");
    for d in shape {
        p.push(b'J');
        p.extend_from_slice(&d.to_le_bytes());
    }
    p.extend_from_slice(b"tq\x08(");
    let mut stride = 1i32;
    let mut strides = vec![0i32; shape.len()];
    for (i, d) in shape.iter().enumerate().rev() {
        strides[i] = stride;
        stride = stride.wrapping_mul(*d);
    }
    for s in strides {
        p.push(b'J');
        p.extend_from_slice(&s.to_le_bytes());
    }
    p.extend_from_slice(b"tq\x09\x89ccollections\nOrderedDict\nq\x0a)Rq\x0btq\x0cRq\x0ds.");
    p
}

/// A torch zip file holding `{"w": tensor of `shape`}` over the floats `values`.
pub fn torch_zip(shape: &[i32], values: &[f32]) -> Vec<u8> {
    let pickle = torch_pickle(shape, values.len() as i32);
    let data = f32_bytes(values);
    zip(
        &[
            ("archive/data.pkl", &pickle),
            ("archive/byteorder", b"little"),
            ("archive/data/0", &data),
            ("archive/version", b"3\n"),
        ],
        0,
    )
}

/// A tiny seeded PRNG (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Values that break readers: boundaries, huge and negative numbers.
pub const NASTY: &[u64] = &[
    0,
    1,
    7,
    8,
    255,
    65_535,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    (1 << 53) - 1,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
];

/// One random mutation of `bytes`: byte flips, a truncation, inserted or deleted bytes, a nasty little-endian
/// number written over some bytes, or a copied span.
pub fn mutate_bytes(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    if b.is_empty() {
        return vec![rng.next() as u8];
    }
    // Many files keep their structure in the first bytes: aim half of the edits there.
    let pick = |rng: &mut Rng, len: usize| {
        if rng.below(2) == 0 {
            rng.below(len.min(512))
        } else {
            rng.below(len)
        }
    };
    match rng.below(7) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                let i = pick(rng, b.len());
                b[i] ^= 1 << rng.below(8);
            }
        }
        1 => {
            let i = pick(rng, b.len());
            b[i] = rng.next() as u8;
        }
        2 => b.truncate(rng.below(b.len())),
        3 => {
            let i = pick(rng, b.len());
            let n = 1 + rng.below(16);
            for _ in 0..n {
                b.insert(i, rng.next() as u8);
            }
        }
        4 => {
            let i = pick(rng, b.len());
            let n = (1 + rng.below(16)).min(b.len() - i);
            b.drain(i..i + n);
        }
        5 => {
            let v = NASTY[rng.below(NASTY.len())];
            let width = [1, 2, 4, 8][rng.below(4)];
            let i = pick(rng, b.len());
            for (k, byte) in v.to_le_bytes().iter().take(width).enumerate() {
                if let Some(x) = b.get_mut(i + k) {
                    *x = *byte;
                }
            }
        }
        _ => {
            let (from, to) = (rng.below(b.len()), pick(rng, b.len()));
            let n = (1 + rng.below(64)).min(b.len() - from).min(b.len() - to);
            let span = b[from..from + n].to_vec();
            b[to..to + n].copy_from_slice(&span);
        }
    }
    b
}

/// A header-aware mutation of a safetensors file: edit one field of one tensor's header entry (dtype, a shape
/// dimension, an offset, a removed field) to a nasty value, then re-frame it (sometimes with a wrong length).
pub fn mutate_safetensors(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    if rng.below(2) == 0 {
        return mutate_bytes(rng, bytes);
    }
    let Some(n) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    else {
        return mutate_bytes(rng, bytes);
    };
    let Some(Ok(serde_json::Value::Object(mut header))) = bytes
        .get(8..8usize.saturating_add(n))
        .map(serde_json::from_slice::<serde_json::Value>)
    else {
        return mutate_bytes(rng, bytes);
    };
    let data = &bytes[8 + n..];
    let keys: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    if keys.is_empty() {
        return mutate_bytes(rng, bytes);
    }
    let entry = header.get_mut(&keys[rng.below(keys.len())]).unwrap();
    if !entry.is_object() {
        return mutate_bytes(rng, bytes);
    }
    let nasty = serde_json::Value::from(NASTY[rng.below(NASTY.len())]);
    match rng.below(6) {
        0 => {
            let dtypes = ["I32", "U8", "BOOL", "F4", "F8_E4M3", "F64", "F16", "XX", ""];
            entry["dtype"] = dtypes[rng.below(dtypes.len())].into();
        }
        1 => {
            if let Some(shape) = entry["shape"].as_array_mut().filter(|s| !s.is_empty()) {
                let i = rng.below(shape.len());
                shape[i] = nasty;
            } else {
                entry["shape"] = serde_json::json!([nasty]);
            }
        }
        2 => {
            let i = rng.below(2);
            match entry["data_offsets"].as_array_mut() {
                Some(offsets) if offsets.len() > i => offsets[i] = nasty,
                _ => entry["data_offsets"] = serde_json::json!([0, nasty]),
            }
        }
        3 => {
            let shape = entry["shape"].clone();
            let mut dims = shape.as_array().cloned().unwrap_or_default();
            dims.push(nasty);
            entry["shape"] = dims.into();
        }
        4 => {
            let fields = ["dtype", "shape", "data_offsets"];
            entry.as_object_mut().unwrap().remove(fields[rng.below(3)]);
        }
        _ => {
            let v = [
                serde_json::json!(-1),
                serde_json::json!(1.5),
                serde_json::json!("x"),
                serde_json::json!(null),
            ];
            let fields = ["dtype", "shape", "data_offsets"];
            entry[fields[rng.below(3)]] = v[rng.below(4)].clone();
        }
    }
    let text = serde_json::Value::Object(header).to_string();
    let mut out = safetensors(&text, data);
    if rng.below(8) == 0 {
        let lie = NASTY[rng.below(NASTY.len())];
        out[..8].copy_from_slice(&lie.to_le_bytes());
    }
    out
}
