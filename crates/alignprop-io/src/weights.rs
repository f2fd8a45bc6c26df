//! Loading tensors by name from safetensors files, or initialising them randomly, through one interface.
//!
//! Models are built with a [`VarBuilder`]: `vb.pp("down_blocks").pp(0).get([c_out, c_in], "weight", init)`.
//! Backed by files, it reads the tensor stored under the full dotted key (`down_blocks.0.weight`), checks the
//! shape and converts the stored dtype (F32, F16, BF16, F64) to the model's dtype. Backed by nothing, it draws the
//! tensor from `init`, so the full-size architecture can be built and run without any download.
//!
//! Files are memory-mapped and never executed: safetensors holds raw little-endian data and a JSON header only.
//!
//! A file is checked whole when it is opened ([`check_header`]): the 8-byte header length against the file size, the
//! JSON header, each tensor's dtype, shape and `data_offsets` (with checked arithmetic, so a lying shape such as
//! `[2^40, 2^40]` is an error, never an allocation), and that the tensors tile the data section exactly. Reading a
//! tensor then copies at most the bytes the file holds. Values are not inspected: a tensor of NaNs is read as it is
//! stored (finiteness is a property of the training run, not of the file format; callers that need it check it).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorData};
use safetensors::{Dtype as StDtype, SafeTensors};

/// Everything that can go wrong while reading weights. Messages name the file, the tensor key and the shapes.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file ({msg})")]
    Format { path: PathBuf, msg: String },
    #[error("tensor '{key}' not found in {files}{hint}")]
    Missing {
        key: String,
        files: String,
        hint: String,
    },
    #[error("{path}: tensor '{key}': expected shape {expected:?}, found {found:?}")]
    Shape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor '{key}': unsupported dtype {dtype} (supported: F32, F16, BF16, F64)")]
    Dtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error("{path}: not a readable PyTorch file ({msg})")]
    Pth { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: cannot write: {msg}")]
    Write { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, WeightError>;

/// One stored tensor: raw bytes, dtype and shape, plus where it came from (for error messages).
#[derive(Clone)]
pub struct RawTensor {
    pub data: TensorData,
    pub shape: Vec<usize>,
    /// The file it was read from.
    pub file: PathBuf,
    /// The key under which it is stored in that file (may differ from the requested key, see [`Renamed`]).
    pub stored_key: String,
}

/// A place tensors are looked up by name.
pub trait TensorSource: Send + Sync {
    /// The tensor stored for `key`, if any.
    fn find(&self, key: &str) -> Result<Option<RawTensor>>;
    /// The files behind this source, for error messages.
    fn describe(&self) -> String;
    /// The key as it is looked up in the files (differs for renaming sources).
    fn stored_key(&self, key: &str) -> String {
        key.to_string()
    }
    /// All keys this source holds, in the source's own naming.
    fn keys(&self) -> Vec<String>;
}

struct MappedFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// Offset of the data section from the start of the file.
    data_start: usize,
    tensors: HashMap<String, (StDtype, Vec<usize>, (usize, usize))>,
    metadata: BTreeMap<String, String>,
}

/// One or more safetensors files, memory-mapped (a sharded checkpoint is just several files).
pub struct SafetensorsSource {
    files: Vec<MappedFile>,
    index: HashMap<String, usize>,
}

impl SafetensorsSource {
    /// Opens and indexes the given files. A key present in two files is taken from the first.
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let path = path.as_ref().to_path_buf();
            let file = std::fs::File::open(&path).map_err(|source| WeightError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the map is read-only and the file is not modified by this process while mapped.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| WeightError::Io {
                path: path.clone(),
                source,
            })?;
            check_header(&mmap).map_err(|msg| WeightError::Format {
                path: path.clone(),
                msg,
            })?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| WeightError::Format {
                    path: path.clone(),
                    msg: one_line(&e.to_string()),
                })?;
            let tensors: HashMap<_, _> = meta
                .tensors()
                .into_iter()
                .map(|(k, info)| (k, (info.dtype, info.shape.clone(), info.data_offsets)))
                .collect();
            for k in tensors.keys() {
                index.entry(k.clone()).or_insert(i);
            }
            let metadata = meta
                .metadata()
                .as_ref()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            files.push(MappedFile {
                path,
                mmap,
                data_start: 8 + header_len,
                tensors,
                metadata,
            });
        }
        Ok(Self { files, index })
    }

    /// The `__metadata__` string map of the first file.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        self.files
            .first()
            .map(|f| f.metadata.clone())
            .unwrap_or_default()
    }

    /// Shape of a stored tensor, without reading it.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let &i = self.index.get(key)?;
        self.files[i].tensors.get(key).map(|t| t.1.clone())
    }
}

/// The largest header the safetensors crate accepts (its `MAX_HEADER_SIZE`).
const MAX_HEADER_LEN: u64 = 100_000_000;

/// Checks a whole safetensors file (`bytes`) before it is indexed, explaining what is wrong in one line: the 8-byte
/// header length against the file size, the JSON header, and for every tensor its dtype, shape and `data_offsets`
/// (with checked arithmetic, so no shape can make a reader allocate more than the file holds), and that the tensors
/// tile the data section exactly, as the format requires.
pub fn check_header(bytes: &[u8]) -> std::result::Result<(), String> {
    let len = bytes.len();
    let Some(n) = bytes.get(..8) else {
        return Err(format!(
            "file is {len} bytes, expected at least the 8-byte header length"
        ));
    };
    let n = u64::from_le_bytes(n.try_into().expect("8 bytes"));
    let after = (len - 8) as u64;
    if n > after {
        return Err(format!(
            "header length {n} (first 8 bytes) exceeds the {after} bytes that follow it (truncated file?)"
        ));
    }
    if n > MAX_HEADER_LEN {
        return Err(format!(
            "header length {n} exceeds the format's limit of {MAX_HEADER_LEN} bytes"
        ));
    }
    let n = n as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).map_err(|e| {
        format!(
            "header is not UTF-8 (invalid byte at header offset {})",
            e.valid_up_to()
        )
    })?;
    let json: serde_json::Value =
        serde_json::from_str(header).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let serde_json::Value::Object(entries) = json else {
        return Err(format!(
            "header is JSON {}, expected an object of tensors",
            json_kind(&json)
        ));
    };
    let data_len = len - 8 - n;
    let mut spans: Vec<(usize, usize, &str)> = Vec::with_capacity(entries.len());
    for (key, entry) in &entries {
        if key == "__metadata__" {
            let ok = entry.is_null()
                || entry
                    .as_object()
                    .is_some_and(|m| m.values().all(serde_json::Value::is_string));
            if !ok {
                return Err(format!(
                    "'__metadata__' is {}, expected an object of strings",
                    json_kind(entry)
                ));
            }
            continue;
        }
        let field = |name: &str| {
            entry.get(name).ok_or_else(|| {
                format!("tensor '{key}': no '{name}' in its header entry (expected dtype, shape, data_offsets)")
            })
        };
        let dtype = field("dtype")?;
        let dtype: StDtype = serde_json::from_value(dtype.clone())
            .map_err(|_| format!("tensor '{key}': unknown dtype {}", short(dtype)))?;
        let shape = field("shape")?;
        let dims: Vec<usize> = shape
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect()
            })
            .ok_or_else(|| {
                format!(
                    "tensor '{key}': shape {}, expected a list of non-negative integers",
                    short(shape)
                )
            })?;
        let offsets = field("data_offsets")?;
        let (start, end) = match offsets.as_array().map(Vec::as_slice) {
            Some([s, e]) => match (s.as_u64(), e.as_u64()) {
                (Some(s), Some(e)) => (s, e),
                _ => (u64::MAX, 0),
            },
            _ => (u64::MAX, 0),
        };
        if start == u64::MAX {
            return Err(format!(
                "tensor '{key}': data_offsets {}, expected [start, end] byte offsets",
                short(offsets)
            ));
        }
        if start > end {
            return Err(format!(
                "tensor '{key}': data_offsets [{start}, {end}] are reversed (start after end)"
            ));
        }
        if end > data_len as u64 {
            return Err(format!(
                "tensor '{key}': data_offsets [{start}, {end}] end past the data section ({data_len} bytes)"
            ));
        }
        let needed = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|elems| elems.checked_mul(dtype.bitsize()));
        if let Some(bits) = needed.filter(|b| b % 8 != 0) {
            return Err(format!(
                "tensor '{key}': {dtype:?} {dims:?} is {bits} bits, expected a whole number of bytes"
            ));
        }
        let needed = needed.map(|bits| bits / 8);
        let (start, end) = (start as usize, end as usize);
        match needed {
            Some(needed) if needed == end - start => {}
            Some(needed) => {
                return Err(format!(
                    "tensor '{key}': {dtype:?} {dims:?} needs {needed} bytes, but data_offsets [{start}, {end}] hold {}",
                    end - start
                ));
            }
            None => {
                return Err(format!(
                    "tensor '{key}': {dtype:?} {dims:?} is larger than any file (its size overflows), data_offsets [{start}, {end}] hold {}",
                    end - start
                ));
            }
        }
        spans.push((start, end, key));
    }
    spans.sort_unstable();
    let mut covered = 0usize;
    let mut previous: Option<(usize, usize, &str)> = None;
    for &(start, end, key) in &spans {
        if start != covered {
            return Err(match previous {
                Some((ps, pe, pk)) if start < covered => {
                    format!("tensors '{pk}' [{ps}, {pe}] and '{key}' [{start}, {end}] overlap")
                }
                Some((ps, pe, pk)) => format!(
                    "{} unused bytes between tensors '{pk}' [{ps}, {pe}] and '{key}' [{start}, {end}]",
                    start - covered
                ),
                None => format!(
                    "tensor '{key}' starts at data offset {start}, expected 0 (first tensor)"
                ),
            });
        }
        covered = end;
        previous = Some((start, end, key));
    }
    if covered != data_len {
        return Err(format!(
            "the tensors cover {covered} bytes, but the data section holds {data_len} (expected equal)"
        ));
    }
    Ok(())
}

/// The kind of a JSON value, for error messages.
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A JSON value for an error message, cut to a readable length.
fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// `msg` on one line (errors of other crates may hold newlines).
pub(crate) fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn to_burn_dtype(dtype: StDtype) -> Option<DType> {
    Some(match dtype {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::I64 => DType::I64,
        StDtype::I32 => DType::I32,
        StDtype::U8 => DType::U8,
        _ => return None,
    })
}

impl TensorSource for SafetensorsSource {
    fn find(&self, key: &str) -> Result<Option<RawTensor>> {
        let Some(&i) = self.index.get(key) else {
            return Ok(None);
        };
        let file = &self.files[i];
        let (dtype, shape, (start, end)) = &file.tensors[key];
        let dt = to_burn_dtype(*dtype).ok_or_else(|| WeightError::Dtype {
            path: file.path.clone(),
            key: key.to_string(),
            dtype: format!("{dtype:?}"),
        })?;
        let bytes = file
            .mmap
            .get(file.data_start + start..file.data_start + end)
            .ok_or_else(|| WeightError::Format {
                path: file.path.clone(),
                msg: format!("tensor '{key}' lies outside the file"),
            })?;
        Ok(Some(RawTensor {
            data: TensorData::from_bytes_vec(bytes.to_vec(), shape.clone(), dt),
            shape: shape.clone(),
            file: file.path.clone(),
            stored_key: key.to_string(),
        }))
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        names.join(", ")
    }

    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.index.keys().cloned().collect();
        k.sort();
        k
    }
}

/// A source that looks keys up under other names: `map(requested) -> stored`. Used for the single-file SD
/// checkpoint layout and for optional prefixes.
pub struct Renamed<S> {
    pub inner: S,
    pub map: Box<dyn Fn(&str) -> String + Send + Sync>,
}

impl<S: TensorSource> TensorSource for Renamed<S> {
    fn find(&self, key: &str) -> Result<Option<RawTensor>> {
        self.inner.find(&(self.map)(key))
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn stored_key(&self, key: &str) -> String {
        self.inner.stored_key(&(self.map)(key))
    }
    fn keys(&self) -> Vec<String> {
        self.inner.keys()
    }
}

impl<S: TensorSource + ?Sized> TensorSource for Box<S> {
    fn find(&self, key: &str) -> Result<Option<RawTensor>> {
        (**self).find(key)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn stored_key(&self, key: &str) -> String {
        (**self).stored_key(key)
    }
    fn keys(&self) -> Vec<String> {
        (**self).keys()
    }
}

impl<S: TensorSource + ?Sized> TensorSource for Arc<S> {
    fn find(&self, key: &str) -> Result<Option<RawTensor>> {
        (**self).find(key)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn stored_key(&self, key: &str) -> String {
        (**self).stored_key(key)
    }
    fn keys(&self) -> Vec<String> {
        (**self).keys()
    }
}

/// How a parameter is initialised when no file backs the builder.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// Uniform in `[-bound, bound]`.
    Uniform(f64),
    /// Normal with mean 0 and the given standard deviation.
    Normal(f64),
}

impl Init {
    /// PyTorch's default for `nn.Linear` / `nn.Conv2d` weights: uniform with bound `1 / sqrt(fan_in)`.
    pub fn fan_in(fan_in: usize) -> Self {
        Init::Uniform(1.0 / (fan_in as f64).sqrt())
    }
}

enum Backing {
    Files(Box<dyn TensorSource>),
    Random,
    Zeros,
}

struct Shared<B: Backend> {
    backing: Backing,
    device: B::Device,
    dtype: DType,
    /// Requested keys with the shape the model asked for, recorded so callers can report tensors a file has that
    /// the model did not use, or re-save the tensors the model reads (format conversion).
    used: Mutex<Vec<(String, Vec<usize>)>>,
}

/// Builds model parameters by dotted name, from files or from random initialisers. Cheap to clone.
pub struct VarBuilder<B: Backend> {
    shared: Arc<Shared<B>>,
    prefix: String,
}

impl<B: Backend> Clone for VarBuilder<B> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            prefix: self.prefix.clone(),
        }
    }
}

impl<B: Backend> fmt::Debug for VarBuilder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VarBuilder({:?} at '{}')",
            self.source_name(),
            self.prefix
        )
    }
}

impl<B: Backend> VarBuilder<B> {
    /// A builder reading from `source`, making tensors of `dtype` on `device`.
    pub fn from_source(
        source: impl TensorSource + 'static,
        device: &B::Device,
        dtype: DType,
    ) -> Self {
        Self::new(Backing::Files(Box::new(source)), device, dtype)
    }

    /// A builder reading the given safetensors files.
    pub fn from_safetensors<P: AsRef<Path>>(
        paths: &[P],
        device: &B::Device,
        dtype: DType,
    ) -> Result<Self> {
        Ok(Self::from_source(
            SafetensorsSource::open(paths)?,
            device,
            dtype,
        ))
    }

    /// A builder that initialises every tensor randomly (with `B::seed` set by the caller for reproducibility).
    pub fn random(device: &B::Device, dtype: DType) -> Self {
        Self::new(Backing::Random, device, dtype)
    }

    /// A builder that makes every tensor zero: a cheap way to build a model for its shapes and parameter count.
    pub fn zeros(device: &B::Device, dtype: DType) -> Self {
        Self::new(Backing::Zeros, device, dtype)
    }

    fn new(backing: Backing, device: &B::Device, dtype: DType) -> Self {
        Self {
            shared: Arc::new(Shared {
                backing,
                device: device.clone(),
                dtype,
                used: Mutex::new(Vec::new()),
            }),
            prefix: String::new(),
        }
    }

    /// The builder for a sub-module: `vb.pp("down_blocks").pp(0)` reads `down_blocks.0.*`.
    pub fn pp(&self, name: impl fmt::Display) -> Self {
        let name = name.to_string();
        let prefix = if self.prefix.is_empty() {
            name
        } else if name.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            shared: self.shared.clone(),
            prefix,
        }
    }

    /// The full dotted key of `name` under this builder's prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn device(&self) -> &B::Device {
        &self.shared.device
    }

    /// The dtype of the tensors this builder makes (F32, F64, F16 or BF16).
    pub fn dtype(&self) -> DType {
        self.shared.dtype
    }

    /// Whether this builder initialises tensors itself (random or zeros) instead of reading files.
    pub fn is_random(&self) -> bool {
        matches!(self.shared.backing, Backing::Random | Backing::Zeros)
    }

    fn source_name(&self) -> String {
        match &self.shared.backing {
            Backing::Files(s) => s.describe(),
            Backing::Random => "random init".into(),
            Backing::Zeros => "zeros".into(),
        }
    }

    /// Whether a tensor `name` exists under this prefix (always false for a random builder).
    pub fn contains(&self, name: &str) -> bool {
        match &self.shared.backing {
            Backing::Files(s) => matches!(s.find(&self.key(name)), Ok(Some(_))),
            Backing::Random | Backing::Zeros => false,
        }
    }

    /// Reads (or initialises) the tensor `name` under this prefix, checking that it has `shape`.
    ///
    /// A stored tensor whose shape differs from `shape` only by trailing dimensions of size 1 is accepted and
    /// reshaped (1x1 convolution weights stored where a linear layer expects a matrix, as in the original SD VAE;
    /// a 0-d scalar such as CLIP's `logit_scale`, stored with shape `[]`, read as `[1]`).
    pub fn get<const D: usize>(
        &self,
        shape: [usize; D],
        name: &str,
        init: Init,
    ) -> Result<Tensor<B, D>> {
        let key = self.key(name);
        let device = &self.shared.device;
        let dtype = self.shared.dtype;
        let record = || {
            self.shared
                .used
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((key.clone(), shape.to_vec()))
        };
        match &self.shared.backing {
            Backing::Zeros => {
                record();
                Ok(Tensor::zeros(shape, (device, dtype)))
            }
            Backing::Random => Ok({
                record();
                match init {
                    Init::Zeros => Tensor::zeros(shape, (device, dtype)),
                    Init::Ones => Tensor::ones(shape, (device, dtype)),
                    Init::Uniform(b) => {
                        Tensor::random(shape, Distribution::Uniform(-b, b), (device, dtype))
                    }
                    Init::Normal(s) => {
                        Tensor::random(shape, Distribution::Normal(0.0, s), (device, dtype))
                    }
                }
            }),
            Backing::Files(source) => {
                let raw = source.find(&key)?.ok_or_else(|| WeightError::Missing {
                    key: source.stored_key(&key),
                    files: source.describe(),
                    hint: if source.stored_key(&key) != key {
                        format!(" (the model's tensor '{key}')")
                    } else {
                        String::new()
                    },
                })?;
                if !matches!(
                    raw.data.dtype,
                    DType::F32 | DType::F16 | DType::BF16 | DType::F64
                ) {
                    return Err(WeightError::Dtype {
                        path: raw.file,
                        key: raw.stored_key,
                        dtype: format!("{:?}", raw.data.dtype),
                    });
                }
                record();
                let squeezed = |s: &[usize]| -> Vec<usize> {
                    let mut v = s.to_vec();
                    while v.last() == Some(&1) {
                        v.pop();
                    }
                    v
                };
                if raw.shape != shape && squeezed(&raw.shape) != squeezed(&shape) {
                    return Err(WeightError::Shape {
                        path: raw.file,
                        key: raw.stored_key,
                        expected: shape.to_vec(),
                        found: raw.shape,
                    });
                }
                let mut data = raw.data;
                data.shape = shape.into();
                Ok(Tensor::from_data(data, (device, dtype)))
            }
        }
    }

    /// Reads the first of several alternative names that exists (e.g. current and legacy diffusers names).
    pub fn get_any<const D: usize>(
        &self,
        shape: [usize; D],
        names: &[&str],
        init: Init,
    ) -> Result<Tensor<B, D>> {
        for name in &names[..names.len() - 1] {
            if self.contains(name) {
                return self.get(shape, name, init);
            }
        }
        self.get(shape, names[names.len() - 1], init)
    }

    /// Keys requested so far (full dotted model names).
    pub fn used_keys(&self) -> Vec<String> {
        self.used_tensors().into_iter().map(|(k, _)| k).collect()
    }

    /// Keys read (or, for a random or zero builder, made) so far, each with the shape the model expects (which may drop trailing 1s of the
    /// stored shape, see [`Self::get`]).
    pub fn used_tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.shared.used.lock().unwrap().clone()
    }
}

fn to_safetensors_dtype(dtype: DType) -> Option<StDtype> {
    Some(match dtype {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::F64 => StDtype::F64,
        DType::I64 => StDtype::I64,
        DType::I32 => StDtype::I32,
        DType::U8 => StDtype::U8,
        _ => return None,
    })
}

/// Writes `tensors` (name, stored data whose `shape` is the one to write) as one safetensors file, atomically: a
/// temporary file renamed into place, so an interrupted write never leaves a truncated file. `metadata` goes into
/// the header's `__metadata__` (diffusers writes `{"format": "pt"}`).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, TensorData)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let err = |msg: String| WeightError::Write {
        path: path.to_path_buf(),
        msg,
    };
    let mut views = Vec::with_capacity(tensors.len());
    for (key, data) in tensors {
        let dtype = to_safetensors_dtype(data.dtype).ok_or_else(|| {
            err(format!(
                "tensor '{key}': dtype {:?} cannot be stored",
                data.dtype
            ))
        })?;
        let view =
            safetensors::tensor::TensorView::new(dtype, data.shape.to_vec(), data.as_bytes())
                .map_err(|e| err(format!("tensor '{key}': {e}")))?;
        views.push((key.clone(), view));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    safetensors::serialize_to_file(views, Some(meta), &tmp).map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
}
