//! Reading PyTorch `.pth` state dicts (torch zip format, as the LAION aesthetic head is published) safely: burn's
//! PyTorch reader parses the pickle without executing any code. Also converts them to safetensors.
//!
//! Before burn's reader sees a file, [`check_torch_zip`] checks the container: a zip archive whose entries are
//! stored (as `torch.save` writes them) and lie inside the file, with a `data.pkl` whose pickle opcodes are all
//! known and whose length-prefixed arguments fit in it. Every tensor's shape times its element size is then checked
//! against the file size before its data is read. So a truncated, garbage or lying file is an error naming the file
//! and what is wrong, never a panic or an allocation larger than the file. (Legacy pre-1.6 `torch.save` files, which
//! are not zip archives, are rejected with that reason.) Any panic left inside burn's reader is caught and reported
//! as an error too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::weights::{RawTensor, Result, TensorSource, WeightError, one_line};
use burn::tensor::{DType, TensorData};
use burn_store::pytorch::PytorchReader;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// A `.pth` file's tensors, read once (these files are small heads, not whole models).
pub struct PthSource {
    path: PathBuf,
    tensors: HashMap<String, TensorData>,
}

impl PthSource {
    /// Reads every tensor of a torch zip file. Errors name the file and what is wrong with it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let err = |msg: String| WeightError::Pth {
            path: path.to_path_buf(),
            msg: one_line(&msg),
        };
        let file = std::fs::File::open(path).map_err(|source| WeightError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only and the file is not modified by this process while mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| WeightError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        check_torch_zip(&mmap).map_err(err)?;
        let file_len = mmap.len();
        drop(mmap);
        // The checks above leave burn's reader nothing known to panic on; any panic left is still an error here.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let reader = PytorchReader::new(path).map_err(|e| e.to_string())?;
            let mut tensors = HashMap::new();
            for (k, snap) in reader.tensors() {
                let elems = snap
                    .shape
                    .as_slice()
                    .iter()
                    .try_fold(1usize, |a, &d| a.checked_mul(d));
                let bytes = elems.and_then(|n| n.checked_mul(snap.dtype.size().max(1)));
                if bytes.is_none_or(|b| b > file_len) {
                    return Err(format!(
                        "tensor '{k}': {:?} {:?} needs {} bytes, more than the whole file ({file_len} bytes)",
                        snap.dtype,
                        snap.shape.as_slice(),
                        bytes.map_or("more than 2^64".to_string(), |b| b.to_string())
                    ));
                }
                let data = snap.to_data().map_err(|e| format!("tensor '{k}': {e:?}"))?;
                tensors.insert(k.clone(), data);
            }
            Ok(tensors)
        }));
        let tensors = match read {
            Ok(Ok(tensors)) => tensors,
            Ok(Err(msg)) => return Err(err(msg)),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown panic");
                return Err(err(format!(
                    "the PyTorch reader failed on this file: {msg}"
                )));
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }
}

impl TensorSource for PthSource {
    fn find(&self, key: &str) -> Result<Option<RawTensor>> {
        Ok(self.tensors.get(key).map(|d| RawTensor {
            data: d.clone(),
            shape: d.shape.as_slice().to_vec(),
            file: self.path.clone(),
            stored_key: key.to_string(),
        }))
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.tensors.keys().cloned().collect();
        k.sort();
        k
    }
}

/// Writes every tensor of a `.pth` state dict to a safetensors file (float tensors as F32).
pub fn pth_to_safetensors(pth: impl AsRef<Path>, out: impl AsRef<Path>) -> Result<usize> {
    let pth = pth.as_ref();
    let out = out.as_ref();
    let src = PthSource::open(pth)?;
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for k in src.keys() {
        let d = &src.tensors[&k];
        // Integer tensors (token id buffers) are written as F32 too, as before; booleans and quantized ones cannot be.
        if matches!(d.dtype, DType::Bool(_) | DType::QFloat(_)) {
            return Err(WeightError::Dtype {
                path: pth.to_path_buf(),
                key: k,
                dtype: format!("{:?}", d.dtype),
            });
        }
        let d = d.clone().convert_dtype(DType::F32);
        owned.push((k, d.shape.as_slice().to_vec(), d.bytes.to_vec()));
    }
    let mut views: Vec<(String, TensorView)> = Vec::with_capacity(owned.len());
    for (k, s, b) in &owned {
        let view = TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| WeightError::Write {
            path: out.to_path_buf(),
            msg: format!("tensor '{k}': {e}"),
        })?;
        views.push((k.clone(), view));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), out).map_err(|e| WeightError::Write {
        path: out.to_path_buf(),
        msg: e.to_string(),
    })?;
    Ok(owned.len())
}

/// Reads a little-endian integer of `N` bytes at `at`, if the bytes are there.
fn le<const N: usize>(bytes: &[u8], at: usize) -> Option<u64> {
    let b: [u8; N] = bytes.get(at..at.checked_add(N)?)?.try_into().ok()?;
    Some(b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64))
}

/// Checks that `bytes` (a whole file) is a torch zip archive burn's reader can read without trusting a single size
/// in it: the end-of-central-directory record (zip64 too), every central directory entry and its local header lie
/// inside the file, every entry is stored uncompressed (as `torch.save` writes them) with its sizes inside the file,
/// and there is a `data.pkl` whose pickle ([`check_pickle`]) is well formed. The message says what is wrong.
pub fn check_torch_zip(bytes: &[u8]) -> std::result::Result<(), String> {
    const EOCD: u64 = 0x0605_4b50;
    const EOCD64: u64 = 0x0606_4b50;
    const LOCATOR64: u64 = 0x0706_4b50;
    const CENTRAL: u64 = 0x0201_4b50;
    const LOCAL: u64 = 0x0403_4b50;
    let len = bytes.len();
    if le::<4>(bytes, 0) != Some(LOCAL) {
        let head: Vec<String> = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "expected a zip archive (first bytes 50 4b 03 04), found [{}] ({len} bytes; legacy pre-1.6 torch \
             files are not supported)",
            head.join(" ")
        ));
    }
    // The end-of-central-directory record: 22 bytes plus a comment of up to 64 KiB, at the end of the file.
    let lowest = len.saturating_sub(22 + 0xffff);
    let eocd = (lowest..=len.saturating_sub(22))
        .rev()
        .find(|&at| le::<4>(bytes, at) == Some(EOCD))
        .ok_or_else(|| {
            format!("no end-of-central-directory record in the last 64 KiB of {len} bytes (truncated zip?)")
        })?;
    let at = |o: usize| eocd + o;
    let mut entries = le::<2>(bytes, at(10)).expect("inside the record");
    let mut cd_size = le::<4>(bytes, at(12)).expect("inside the record");
    let mut cd_offset = le::<4>(bytes, at(16)).expect("inside the record");
    if entries == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff {
        let locator = eocd
            .checked_sub(20)
            .filter(|&l| le::<4>(bytes, l) == Some(LOCATOR64))
            .ok_or("zip64 sizes without a zip64 end-of-central-directory locator")?;
        let record = le::<8>(bytes, locator + 8).expect("inside the locator");
        let record = usize::try_from(record)
            .ok()
            .filter(|&r| le::<4>(bytes, r) == Some(EOCD64))
            .ok_or_else(|| {
                format!(
                    "zip64 end-of-central-directory record expected at offset {record}, not found"
                )
            })?;
        let field = |o: usize| {
            le::<8>(bytes, record + o).ok_or("truncated zip64 end-of-central-directory record")
        };
        entries = field(32)?;
        cd_size = field(40)?;
        cd_offset = field(48)?;
    }
    let cd_end = cd_offset.checked_add(cd_size).filter(|&e| e <= eocd as u64);
    let Some(cd_end) = cd_end else {
        return Err(format!(
            "central directory at offset {cd_offset} ({cd_size} bytes) ends past its end record at {eocd}"
        ));
    };
    if entries.checked_mul(46).is_none_or(|b| b > cd_size) {
        return Err(format!(
            "{entries} entries cannot fit in a {cd_size}-byte central directory"
        ));
    }
    let (mut pos, cd_end) = (cd_offset as usize, cd_end as usize);
    let mut pickle: Option<(String, usize, usize)> = None;
    let mut names = Vec::new();
    for i in 0..entries {
        if le::<4>(bytes, pos) != Some(CENTRAL) || pos + 46 > cd_end {
            return Err(format!(
                "central directory entry {i} of {entries} at offset {pos}: no entry header there"
            ));
        }
        let method = le::<2>(bytes, pos + 10).expect("inside the entry");
        let mut compressed = le::<4>(bytes, pos + 20).expect("inside the entry");
        let mut size = le::<4>(bytes, pos + 24).expect("inside the entry");
        let name_len = le::<2>(bytes, pos + 28).expect("inside the entry") as usize;
        let extra_len = le::<2>(bytes, pos + 30).expect("inside the entry") as usize;
        let comment_len = le::<2>(bytes, pos + 32).expect("inside the entry") as usize;
        let mut local = le::<4>(bytes, pos + 42).expect("inside the entry");
        let next = pos + 46 + name_len + extra_len + comment_len;
        if next > cd_end {
            return Err(format!(
                "central directory entry {i} at offset {pos} runs past the directory's end ({cd_end})"
            ));
        }
        let name = String::from_utf8_lossy(&bytes[pos + 46..pos + 46 + name_len]).into_owned();
        // Zip64 sizes: an extra field 0x0001 holding the 64-bit values of the fields set to 0xffffffff.
        let mut extra = &bytes[pos + 46 + name_len..pos + 46 + name_len + extra_len];
        while extra.len() >= 4 {
            let (id, n) = (
                le::<2>(extra, 0).unwrap(),
                le::<2>(extra, 2).unwrap() as usize,
            );
            let body = extra.get(4..4 + n).ok_or_else(|| {
                format!("entry '{name}': extra field of {n} bytes runs past its entry")
            })?;
            if id == 1 {
                let mut at = 0;
                for v in [&mut size, &mut compressed, &mut local] {
                    if *v == 0xffff_ffff {
                        *v = le::<8>(body, at)
                            .ok_or_else(|| format!("entry '{name}': truncated zip64 sizes"))?;
                        at += 8;
                    }
                }
            }
            extra = &extra[4 + n..];
        }
        if method != 0 {
            return Err(format!(
                "entry '{name}': compression method {method}, expected 0 (stored, as torch.save writes)"
            ));
        }
        if compressed != size {
            return Err(format!(
                "entry '{name}': stored entry with compressed size {compressed} but size {size} (expected equal)"
            ));
        }
        let local = usize::try_from(local).unwrap_or(usize::MAX);
        if le::<4>(bytes, local) != Some(LOCAL) {
            return Err(format!(
                "entry '{name}': no local header at offset {local} ({len}-byte file)"
            ));
        }
        let local_name = le::<2>(bytes, local + 26).ok_or("truncated local header")? as usize;
        let local_extra = le::<2>(bytes, local + 28).ok_or("truncated local header")? as usize;
        let data = local + 30 + local_name + local_extra;
        let end = (data as u64).checked_add(size).filter(|&e| e <= len as u64);
        if end.is_none() {
            return Err(format!(
                "entry '{name}': {size} bytes at offset {data} run past the end of the {len}-byte file"
            ));
        }
        let is_pickle = name == "data.pkl" || name.ends_with("/data.pkl");
        if is_pickle && pickle.is_none() {
            pickle = Some((name.clone(), data, size as usize));
        }
        if names.len() < 3 {
            names.push(name);
        }
        pos = next;
    }
    let (name, start, size) = pickle.ok_or_else(|| {
        format!(
            "no data.pkl among the zip's {entries} entries (first: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )
    })?;
    check_pickle(&bytes[start..start + size]).map_err(|e| format!("{name}: {e}"))
}

/// Deepest object nesting [`check_pickle`] lets through: burn-store's reader builds (and drops) nested values
/// recursively, so a pickle nested a million levels deep would overflow the stack (an abort, which no error
/// handling can catch). A torch state dict nests about six levels.
pub const MAX_PICKLE_NESTING: u32 = 1000;

/// The nesting depth of the pickle machine's stack, simulated per opcode: atoms are depth 0, a container built from
/// items is one deeper than its deepest item. Lenient: an underflow reads depth 0 (the opcode check, not this,
/// rejects malformed pickles), and memo references count as atoms.
#[derive(Default)]
struct Nesting {
    stack: Vec<u32>,
    marks: Vec<usize>,
}

impl Nesting {
    fn pop(&mut self) -> u32 {
        self.stack.pop().unwrap_or(0)
    }

    fn pop_to_mark(&mut self) -> u32 {
        let mark = self.marks.pop().unwrap_or(0).min(self.stack.len());
        self.stack.drain(mark..).max().unwrap_or(0)
    }

    fn deepen_top(&mut self, child: u32) -> u32 {
        match self.stack.last_mut() {
            Some(top) => {
                *top = (*top).max(child + 1);
                *top
            }
            None => child + 1,
        }
    }

    fn push(&mut self, depth: u32) -> u32 {
        self.stack.push(depth);
        depth
    }

    /// Applies opcode `op`; returns the depth it produced (0 when it builds nothing).
    fn apply(&mut self, op: u8) -> u32 {
        match op {
            b'(' => {
                self.marks.push(self.stack.len());
                0
            }
            // TUPLE, LIST, DICT, FROZENSET, OBJ, INST: a container of the items above the mark.
            b't' | b'l' | b'd' | 0x91 | b'o' | b'i' => {
                let d = self.pop_to_mark();
                self.push(d + 1)
            }
            // APPENDS, SETITEMS, ADDITEMS: the items above the mark go into the container below it.
            b'e' | b'u' | 0x90 => {
                let d = self.pop_to_mark();
                self.deepen_top(d)
            }
            b'1' => {
                self.pop_to_mark();
                0
            }
            // EMPTY_TUPLE, EMPTY_LIST, EMPTY_DICT, EMPTY_SET.
            b')' | b']' | b'}' | 0x8f => self.push(1),
            // TUPLE1, TUPLE2, TUPLE3.
            0x85..=0x87 => {
                let d = (0..op - 0x84).map(|_| self.pop()).max().unwrap_or(0);
                self.push(d + 1)
            }
            // APPEND, BUILD: one item into the object below.
            b'a' | b'b' => {
                let d = self.pop();
                self.deepen_top(d)
            }
            b's' => {
                let d = self.pop().max(self.pop());
                self.deepen_top(d)
            }
            // REDUCE, NEWOBJ: callable / class and arguments -> object.
            b'R' | 0x81 => {
                let d = self.pop().max(self.pop());
                self.push(d + 1)
            }
            0x92 => {
                let d = self.pop().max(self.pop()).max(self.pop());
                self.push(d + 1)
            }
            // STACK_GLOBAL: module and name -> a global.
            0x93 => {
                self.pop();
                self.pop();
                self.push(0)
            }
            b'Q' => {
                let d = self.pop();
                self.push(d + 1)
            }
            b'0' => {
                self.pop();
                0
            }
            b'2' => {
                let d = self.stack.last().copied().unwrap_or(0);
                self.push(d)
            }
            // PROTO, FRAME, PUT, BINPUT, LONG_BINPUT, MEMOIZE, STOP: no stack change.
            0x80 | 0x95 | b'p' | b'q' | b'r' | 0x94 | b'.' => 0,
            // Everything else pushes one atom (numbers, strings, None, booleans, GLOBAL, GET, PERSID, ...).
            _ => self.push(0),
        }
    }
}

/// Walks a pickle's opcodes without building anything: every opcode must be known, every argument must fit in
/// the bytes left (so no length in the pickle can make a reader allocate more than the pickle holds), and the
/// pickle must end with STOP.
pub fn check_pickle(p: &[u8]) -> std::result::Result<(), String> {
    let mut i = 0usize;
    let mut nesting = Nesting::default();
    while i < p.len() {
        let (at, op) = (i, p[i]);
        i += 1;
        if nesting.apply(op) > MAX_PICKLE_NESTING {
            return Err(format!(
                "objects nested deeper than {MAX_PICKLE_NESTING} levels at byte {at} (a state dict nests a few)"
            ));
        }
        let need = |n: u64, i: usize| -> std::result::Result<usize, String> {
            let left = (p.len() - i) as u64;
            if n > left {
                Err(format!(
                    "opcode 0x{op:02x} at byte {at} needs {n} bytes, only {left} left (truncated?)"
                ))
            } else {
                Ok(n as usize)
            }
        };
        let line = |i: usize| -> std::result::Result<usize, String> {
            p[i..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|n| n + 1)
                .ok_or_else(|| {
                    format!("opcode 0x{op:02x} at byte {at}: argument has no end of line")
                })
        };
        let arg = match op {
            b'.' => return Ok(()),
            // No argument.
            b'('
            | b'0'
            | b'1'
            | b'2'
            | b'N'
            | b'Q'
            | b'R'
            | b'a'
            | b'b'
            | b'd'
            | b'}'
            | b'e'
            | b'l'
            | b']'
            | b'o'
            | b's'
            | b't'
            | b')'
            | b'u'
            | 0x81
            | 0x85..=0x89
            | 0x8f..=0x94
            | 0x97
            | 0x98 => 0,
            b'K' | b'h' | b'q' | 0x80 | 0x82 => need(1, i)?,
            b'M' | 0x83 => need(2, i)?,
            b'J' | b'j' | b'r' | 0x84 => need(4, i)?,
            b'G' | 0x95 => need(8, i)?,
            b'U' | b'C' | 0x8a | 0x8c => {
                let n = need(1, i)?;
                n + need(p[i] as u64, i + n)?
            }
            b'T' | b'X' | b'B' | 0x8b => {
                let n = need(4, i)?;
                n + need(le::<4>(p, i).unwrap(), i + n)?
            }
            0x8d | 0x8e | 0x96 => {
                let n = need(8, i)?;
                n + need(le::<8>(p, i).unwrap(), i + n)?
            }
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'g' | b'p' => line(i)?,
            b'c' | b'i' => {
                let first = line(i)?;
                first + line(i + first)?
            }
            _ => return Err(format!("unknown pickle opcode 0x{op:02x} at byte {at}")),
        };
        i += arg;
    }
    Err(format!(
        "pickle ends after {} bytes without STOP (truncated?)",
        p.len()
    ))
}
