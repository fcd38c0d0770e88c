//! Activations over a corpus: the job behind probing, SAE training data and dataset-level
//! statistics. One [`Plan`] runs on every batch of the corpus; the saves are written per document
//! into numbered safetensors shards with a `manifest.json`, so that a killed run resumes after its
//! last complete shard, and runs split over machines ([`Shard`]) merge into one ([`merge`]).
//!
//! ```no_run
//! use nnscope::collect::{collect, CollectOptions, Corpus, Positions};
//! use nnscope::Model;
//! let model = Model::load("tests/fixtures/llama", &Default::default())?;
//! let corpus = Corpus::text("corpus.txt");
//! let opts = CollectOptions::new(&model, &["layers_output.1"], Positions::Mean);
//! let summary = collect(&model, &corpus, "acts".as_ref(), &opts)?;
//! println!("{summary}");
//! # Ok::<(), nnscope::Error>(())
//! ```
//!
//! Layout of the output folder:
//! - `part-00000.safetensors`, `part-00001.safetensors`, ...: each holds `shard_documents`
//!   documents (the last one fewer), in corpus order. Each save is a float32 tensor under its name:
//!   `[documents, ...]` for [`Positions::Last`] and [`Positions::Mean`], `[tokens, ...]` for
//!   [`Positions::All`] with `document_offsets` (int64 `[documents + 1]`: document `d` is rows
//!   `offsets[d]..offsets[d + 1]`). Every shard also holds `document_index` (int64, the document's
//!   record number in the corpus, counted from 0) and `document_tokens` (int64, its token count
//!   after truncation).
//! - `manifest.json`: see [`Manifest`].
//!
//! Sparse autoencoders ([`CollectOptions::saes`]) add their hookpoints to what can be saved:
//! `--save H.sae.feature_acts` stores an SAE's feature activations `[.., d_sae]`. With
//! [`CollectOptions::top_k`] = `Some(k)`, each such save keeps only the `k` largest features of
//! each row (a token for [`Positions::All`] and [`Positions::Last`]; the document's mean
//! activation for [`Positions::Mean`], i.e. the top-k of the mean, not the mean of top-ks), stored
//! as two tensors: `H.sae.feature_acts.top_k_values` (float32 `[rows, k]`, largest first) and
//! `H.sae.feature_acts.top_k_indices` (int64 `[rows, k]`, the feature numbers); see
//! [`top_k_names`]. The manifest records the SAEs (spec, hooks, splice, sha256 of the weights),
//! the clamps and `top_k`, and a resume refuses a job where any of them changed.

use crate::{Attach, Clamp, Error, Input, Model, Plan, Result, Sae};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The manifest's `format` value.
pub const FORMAT: &str = "nnscope-collect-1";
/// Names written beside the saves in every shard (a save cannot take them).
pub const RESERVED: [&str; 3] = ["document_index", "document_tokens", "document_offsets"];

/// The suffixes of the two tensors a top-k save is stored as (see [`top_k_names`]).
pub const TOP_K_SUFFIXES: [&str; 2] = [".top_k_values", ".top_k_indices"];

/// The names in the shards of save `save` stored top-k: (`save.top_k_values`: float32 `[rows, k]`,
/// largest first; `save.top_k_indices`: int64 `[rows, k]`, feature numbers along the last axis).
pub fn top_k_names(save: &str) -> (String, String) {
    (
        format!("{save}{}", TOP_K_SUFFIXES[0]),
        format!("{save}{}", TOP_K_SUFFIXES[1]),
    )
}

/// Whether a save is an SAE's feature activations (what [`CollectOptions::top_k`] applies to).
pub fn is_feature_acts(save: &str) -> bool {
    save.ends_with(".sae.feature_acts")
}

/// An SAE attached during a collection, as [`Manifest::saes`] records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaeRecord {
    /// The folder (absolute) or hub spec `org/repo:folder` it was loaded from.
    pub spec: String,
    /// The hookpoint it reads (as given, or its cfg.json's `hook_name`).
    pub hook: String,
    /// A transcoder's output hookpoint.
    pub hook_out: Option<String>,
    /// Whether it was spliced (its reconstruction replaced the hook's value).
    pub splice: bool,
    /// sha256 of its `sae_weights.safetensors`.
    pub weights_sha256: String,
}

impl std::fmt::Display for SaeRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.spec, self.hook)?;
        if let Some(o) = &self.hook_out {
            write!(f, "->{o}")?;
        }
        if self.splice {
            f.write_str(" spliced")?;
        }
        write!(
            f,
            " (weights {})",
            &self.weights_sha256[..self.weights_sha256.len().min(12)]
        )
    }
}

/// Which token positions of each document a save keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// Every token: `[tokens, ...]` with document offsets.
    All,
    /// The last token of each document: `[documents, ...]`.
    Last,
    /// The mean over the document's tokens (padding excluded): `[documents, ...]`.
    Mean,
}

impl std::str::FromStr for Positions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Positions::All),
            "last" => Ok(Positions::Last),
            "mean" => Ok(Positions::Mean),
            o => Err(Error::Input(format!(
                "positions `{o}`: use all, last or mean"
            ))),
        }
    }
}

impl std::fmt::Display for Positions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Positions::All => "all",
            Positions::Last => "last",
            Positions::Mean => "mean",
        })
    }
}

/// A deterministic 1/N of a corpus: part `index` (from 0) of `count` contiguous, near-equal ranges
/// of records (`index * R / count .. (index + 1) * R / count` for R records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// Which part, from 0.
    pub index: usize,
    /// Into how many parts.
    pub count: usize,
}

impl Shard {
    /// The records of a corpus of `records` that this shard takes.
    pub fn range(&self, records: usize) -> std::ops::Range<usize> {
        let at = |i: usize| ((i as u128 * records as u128) / self.count as u128) as usize;
        at(self.index)..at(self.index + 1)
    }
}

impl std::str::FromStr for Shard {
    type Err = Error;
    /// `I/N` with `0 <= I < N`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::Input(format!(
                "shard `{s}`: expected I/N with 0 <= I < N (I counts from 0)"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// A corpus file: plain text (one document a line) or JSON Lines (one object a line, the document
/// under `field`; blank lines are not records).
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The file.
    pub path: PathBuf,
    /// `None` for plain text; the JSON field for JSON Lines.
    pub field: Option<String>,
}

impl Corpus {
    /// Plain text, one document a line (an empty line is a document without tokens: skipped, but
    /// counted as a record).
    pub fn text(path: impl Into<PathBuf>) -> Self {
        Corpus {
            path: path.into(),
            field: None,
        }
    }

    /// JSON Lines, the document's text under `field`.
    pub fn json_lines(path: impl Into<PathBuf>, field: &str) -> Self {
        Corpus {
            path: path.into(),
            field: Some(field.to_string()),
        }
    }

    fn open(&self) -> Result<BufReader<std::fs::File>> {
        std::fs::File::open(&self.path)
            .map(|f| BufReader::with_capacity(1 << 20, f))
            .map_err(|e| Error::Io {
                path: self.path.clone(),
                source: e,
            })
    }

    fn io(&self, e: std::io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source: e,
        }
    }

    /// The number of records and the file's sha256 (one streaming pass).
    pub fn scan(&self) -> Result<(usize, String)> {
        let mut r = self.open()?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut records = 0usize;
        let mut line_has_text = false;
        let mut in_line = false;
        loop {
            let n = r.read(&mut buf).map_err(|e| self.io(e))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            for &b in &buf[..n] {
                if b == b'\n' {
                    if self.field.is_none() || line_has_text {
                        records += 1;
                    }
                    line_has_text = false;
                    in_line = false;
                } else {
                    in_line = true;
                    if !b.is_ascii_whitespace() {
                        line_has_text = true;
                    }
                }
            }
        }
        if in_line && (self.field.is_none() || line_has_text) {
            records += 1;
        }
        Ok((records, format!("{:x}", hash.finalize())))
    }

    /// The records in order, each with its 1-based line number.
    pub fn records(&self) -> Result<Records> {
        Ok(Records {
            corpus: self.clone(),
            reader: self.open()?,
            line: 0,
            buf: Vec::new(),
        })
    }
}

/// Iterator over a corpus's documents (see [`Corpus::records`]).
pub struct Records {
    corpus: Corpus,
    reader: BufReader<std::fs::File>,
    line: usize,
    buf: Vec<u8>,
}

impl Records {
    /// Skips `n` records without decoding them (JSON Lines: blank lines are not records).
    pub fn skip_records(&mut self, n: usize) -> Result<usize> {
        let mut skipped = 0;
        while skipped < n {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(self.corpus.io(e)),
            }
            self.line += 1;
            if self.corpus.field.is_none() || self.buf.iter().any(|b| !b.is_ascii_whitespace()) {
                skipped += 1;
            }
        }
        Ok(skipped)
    }
}

impl Iterator for Records {
    type Item = Result<String>;
    fn next(&mut self) -> Option<Result<String>> {
        loop {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(self.corpus.io(e))),
            }
            self.line += 1;
            let mut b: &[u8] = &self.buf;
            if b.last() == Some(&b'\n') {
                b = &b[..b.len() - 1];
            }
            if b.last() == Some(&b'\r') {
                b = &b[..b.len() - 1];
            }
            let line = self.line;
            let path = &self.corpus.path;
            let text = match std::str::from_utf8(b) {
                Ok(t) => t,
                Err(e) => {
                    return Some(Err(Error::Input(format!(
                        "{}:{line}: not UTF-8 text ({e})",
                        path.display()
                    ))))
                }
            };
            let Some(field) = &self.corpus.field else {
                return Some(Ok(text.to_string()));
            };
            if text.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => {
                    return Some(Err(Error::Input(format!(
                        "{}:{line}: not a JSON object ({e}); give a plain text file (one document a line) or JSON Lines",
                        path.display()
                    ))))
                }
            };
            return Some(match v.get(field) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(Error::Input(format!(
                    "{}:{line}: field `{field}` is not a string ({})",
                    path.display(),
                    match other {
                        serde_json::Value::Null => "null",
                        serde_json::Value::Bool(_) => "a boolean",
                        serde_json::Value::Number(_) => "a number",
                        serde_json::Value::Array(_) => "an array",
                        _ => "an object",
                    }
                ))),
                None => Err(Error::Input(format!(
                    "{}:{line}: no field `{field}`{}",
                    path.display(),
                    match v.as_object() {
                        Some(o) if !o.is_empty() => format!(
                            " (fields: {}); choose one with --field",
                            o.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                        _ => String::new(),
                    }
                ))),
            });
        }
    }
}

/// One shard file in a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    /// File name inside the folder (`part-00000.safetensors`).
    pub file: String,
    /// Documents in it.
    pub documents: usize,
    /// Tokens of those documents (after truncation).
    pub tokens: usize,
    /// The corpus record after its last document (where the next part starts reading).
    pub end_record: usize,
}

/// `manifest.json`: what was collected, from what, and how far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// The model as given (a folder as an absolute path).
    pub model: String,
    /// Its `model_type`.
    pub model_type: String,
    /// The hub commit (or the revision given), when known.
    pub revision: Option<String>,
    /// Compute dtype (`float32`, `bfloat16`, `float16`); values are written as float32.
    pub dtype: String,
    /// The saves, as names in the shards.
    pub saves: Vec<String>,
    /// Which positions.
    pub positions: Positions,
    /// Documents were truncated to this many tokens.
    pub max_tokens: Option<usize>,
    /// sha256 of tokenizer.json.
    pub tokenizer_sha256: String,
    /// The corpus file as given.
    pub dataset: String,
    /// sha256 of the corpus file.
    pub dataset_sha256: String,
    /// The JSON field (JSON Lines), or `None` for plain text.
    pub field: Option<String>,
    /// Records in the whole corpus.
    pub records: usize,
    /// This folder's 1/N of the corpus, or `None` for the whole corpus (or a merge).
    pub shard: Option<Shard>,
    /// The corpus records this folder covers.
    pub record_range: [usize; 2],
    /// Documents per part (the last part of a run may hold fewer).
    pub shard_documents: usize,
    /// The complete parts, in corpus order.
    pub parts: Vec<Part>,
    /// Documents in all parts.
    pub documents: usize,
    /// Tokens in all parts.
    pub tokens: usize,
    /// Whether every record of `record_range` was processed.
    pub finished: bool,
    /// The sparse autoencoders attached, in order (empty when none).
    #[serde(default)]
    pub saes: Vec<SaeRecord>,
    /// The clamps, as `NAME:INDEX=VALUE`, in order.
    #[serde(default)]
    pub clamps: Vec<String>,
    /// Saves of SAE feature activations keep only the `k` largest features of each row, as
    /// `SAVE.top_k_values` and `SAVE.top_k_indices` (see [`top_k_names`]).
    #[serde(default)]
    pub top_k: Option<usize>,
}

impl Manifest {
    /// Reads `DIR/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let p = dir.join("manifest.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::Io {
            path: p.clone(),
            source: e,
        })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::Output {
            path: p.clone(),
            msg: format!("not an nnscope collect manifest: {e}"),
        })?;
        if m.format != FORMAT {
            return Err(Error::Output {
                path: p,
                msg: format!("format `{}`, this nnscope reads `{FORMAT}`", m.format),
            });
        }
        Ok(m)
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Output {
            path: dir.join("manifest.json"),
            msg: e.to_string(),
        })?;
        write_atomic(&dir.join("manifest.json"), text.as_bytes())
    }

    /// The first setting in which `self` and `other` differ (the corpus split and progress aside),
    /// as `(what, self's, other's)`.
    fn differs(&self, other: &Manifest) -> Option<(&'static str, String, String)> {
        let s = |v: &dyn std::fmt::Debug| format!("{v:?}");
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        let saes = |m: &Manifest| list(&m.saes.iter().map(|r| r.to_string()).collect::<Vec<_>>());
        let checks: [(&str, String, String); 13] = [
            ("model", self.model.clone(), other.model.clone()),
            (
                "model type",
                self.model_type.clone(),
                other.model_type.clone(),
            ),
            ("revision", s(&self.revision), s(&other.revision)),
            ("dtype", self.dtype.clone(), other.dtype.clone()),
            ("saves", self.saves.join(" "), other.saves.join(" ")),
            (
                "positions",
                self.positions.to_string(),
                other.positions.to_string(),
            ),
            ("max tokens", s(&self.max_tokens), s(&other.max_tokens)),
            (
                "tokenizer (sha256 of tokenizer.json)",
                self.tokenizer_sha256.clone(),
                other.tokenizer_sha256.clone(),
            ),
            (
                "dataset (sha256)",
                self.dataset_sha256.clone(),
                other.dataset_sha256.clone(),
            ),
            ("JSON field", s(&self.field), s(&other.field)),
            ("SAEs", saes(self), saes(other)),
            ("clamps", list(&self.clamps), list(&other.clamps)),
            ("top-k", s(&self.top_k), s(&other.top_k)),
        ];
        checks.into_iter().find(|(_, a, b)| a != b)
    }
}

/// Settings of [`collect`].
#[derive(Debug, Clone)]
pub struct CollectOptions {
    /// Standard names or hookpoint paths; each value must be `[batch, tokens, ...]`.
    pub saves: Vec<String>,
    /// Which positions to keep.
    pub positions: Positions,
    /// Truncate each document to this many tokens (its first ones). `None`: the model's maximum
    /// length where it has one, else no truncation.
    pub max_tokens: Option<usize>,
    /// Documents per forward (left-padded).
    pub batch_size: usize,
    /// Documents per shard file.
    pub shard_documents: usize,
    /// Take only this 1/N of the corpus.
    pub shard: Option<Shard>,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// The model as the user named it (recorded in the manifest; a resume must name the same).
    pub model_id: String,
    /// The revision asked for (a hub snapshot's commit is recorded when the model is one).
    pub revision: Option<String>,
    /// Sparse autoencoders or transcoders to attach (in order; [`Attach::splice`] splices one).
    /// Their hookpoints (`H.sae.feature_acts`, `H.sae.reconstruction`, `H.sae.error`) can then be
    /// saved.
    pub saes: Vec<Attach>,
    /// Values clamped during every forward (applied after the SAEs are attached).
    pub clamps: Vec<Clamp>,
    /// Keep only the `k` largest features of each row of every save of SAE feature activations
    /// (`H.sae.feature_acts`); see the [module documentation](self).
    pub top_k: Option<usize>,
}

impl CollectOptions {
    /// Defaults: batch 8, 1000 documents a shard, the whole corpus, no progress bar.
    pub fn new<S: AsRef<str>>(model: &Model, saves: &[S], positions: Positions) -> Self {
        CollectOptions {
            saves: saves.iter().map(|s| s.as_ref().to_string()).collect(),
            positions,
            max_tokens: None,
            batch_size: 8,
            shard_documents: 1000,
            shard: None,
            progress: false,
            model_id: model.source.display().to_string(),
            revision: None,
            saes: Vec::new(),
            clamps: Vec::new(),
            top_k: None,
        }
    }
}

/// What a [`collect`] or [`merge`] did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The folder.
    pub out: PathBuf,
    /// Documents in the folder.
    pub documents: usize,
    /// Tokens in the folder.
    pub tokens: usize,
    /// Shard files in the folder.
    pub parts: usize,
    /// Shard files that were already there (a resume).
    pub resumed_parts: usize,
    /// Documents and tokens processed by this call.
    pub new_documents: usize,
    /// Tokens processed by this call.
    pub new_tokens: usize,
    /// Seconds this call took.
    pub seconds: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} documents, {} tokens in {} shard{} in {}",
            self.documents,
            self.tokens,
            self.parts,
            if self.parts == 1 { "" } else { "s" },
            self.out.display()
        )?;
        if self.resumed_parts > 0 {
            write!(f, " ({} shards were already complete)", self.resumed_parts)?;
        }
        write!(
            f,
            "; this run: {} documents, {} tokens in {:.1} s ({:.0} tokens/s)",
            self.new_documents,
            self.new_tokens,
            self.seconds,
            self.new_tokens as f64 / self.seconds.max(1e-9)
        )
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Writes `bytes` to a hidden temporary file beside `path`, flushes it to disk, and renames it.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

fn part_name(i: usize) -> String {
    format!("part-{i:05}.safetensors")
}

fn is_part_name(n: &str) -> bool {
    n.starts_with("part-") && n.ends_with(".safetensors")
}

fn dtype_name(d: DType) -> String {
    match d {
        DType::F32 => "float32".into(),
        DType::BF16 => "bfloat16".into(),
        DType::F16 => "float16".into(),
        o => format!("{o:?}"),
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The shard buffer: values per save, and per-document bookkeeping.
struct Buffer {
    values: Vec<Vec<f32>>,
    /// Per save stored top-k: the feature indices.
    indices: Vec<Vec<i64>>,
    /// Per save: the dimensions after the token dimension.
    rest: Vec<Option<Vec<usize>>>,
    index: Vec<i64>,
    tokens: Vec<i64>,
}

impl Buffer {
    fn new(saves: usize) -> Self {
        Buffer {
            values: vec![Vec::new(); saves],
            indices: vec![Vec::new(); saves],
            rest: vec![None; saves],
            index: Vec::new(),
            tokens: Vec::new(),
        }
    }
    fn clear(&mut self) {
        for v in &mut self.values {
            *v = Vec::new(); // release the memory: shards are the memory bound
        }
        for v in &mut self.indices {
            *v = Vec::new();
        }
        self.index = Vec::new();
        self.tokens = Vec::new();
    }
}

fn serialize(
    saves: &[String],
    top_k: &[Option<usize>],
    buf: &Buffer,
    positions: Positions,
) -> Result<Vec<u8>> {
    use safetensors::tensor::TensorView;
    let docs = buf.index.len();
    let total: usize = buf.tokens.iter().map(|&t| t as usize).sum();
    let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let i64_bytes = |v: &[i64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, name) in saves.iter().enumerate() {
        let rest = buf.rest[i].clone().unwrap_or_default();
        let mut shape = vec![if positions == Positions::All {
            total
        } else {
            docs
        }];
        shape.extend(rest);
        if top_k[i].is_some() {
            let (vn, inn) = top_k_names(name);
            owned.push((
                vn,
                safetensors::Dtype::F32,
                shape.clone(),
                f32_bytes(&buf.values[i]),
            ));
            owned.push((
                inn,
                safetensors::Dtype::I64,
                shape,
                i64_bytes(&buf.indices[i]),
            ));
            continue;
        }
        owned.push((
            name.clone(),
            safetensors::Dtype::F32,
            shape,
            f32_bytes(&buf.values[i]),
        ));
    }
    owned.push((
        "document_index".into(),
        safetensors::Dtype::I64,
        vec![docs],
        i64_bytes(&buf.index),
    ));
    owned.push((
        "document_tokens".into(),
        safetensors::Dtype::I64,
        vec![docs],
        i64_bytes(&buf.tokens),
    ));
    if positions == Positions::All {
        let mut off = vec![0i64];
        for &t in &buf.tokens {
            off.push(off[off.len() - 1] + t);
        }
        owned.push((
            "document_offsets".into(),
            safetensors::Dtype::I64,
            vec![docs + 1],
            i64_bytes(&off),
        ));
    }
    let views = owned
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Input(format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("positions".to_string(), positions.to_string());
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::Input(e.to_string()))
}

/// What the manifest records of an attached SAE.
fn sae_record(a: &Attach) -> Result<SaeRecord> {
    let sae: &Sae = &a.sae;
    let hook = a
        .hook
        .clone()
        .or_else(|| sae.hook_name.clone())
        .ok_or_else(|| {
            Error::Input(format!(
                "SAE {}: its cfg.json names no `hook_name`; give the hookpoint (`SPEC=HOOK`)",
                sae.spec
            ))
        })?;
    let hook_out = if sae.transcoder {
        a.hook_out.clone().or_else(|| sae.hook_name_out.clone())
    } else {
        None
    };
    let w = sae.dir.join("sae_weights.safetensors");
    let mut f = std::fs::File::open(&w).map_err(io_err(&w))?;
    let mut hash = Sha256::new();
    std::io::copy(&mut f, &mut hash).map_err(io_err(&w))?;
    Ok(SaeRecord {
        spec: sae.spec.clone(),
        hook,
        hook_out,
        splice: a.splice,
        weights_sha256: format!("{:x}", hash.finalize()),
    })
}

/// sha256 of the model's tokenizer.json.
fn tokenizer_hash(model: &Model) -> Result<String> {
    let p = model.source.join("tokenizer.json");
    if model.tokenizer.is_none() || !p.is_file() {
        return Err(Error::Tokenizer {
            path: p,
            msg: "missing: collecting over a text corpus needs the model's tokenizer.json".into(),
        });
    }
    let bytes = std::fs::read(&p).map_err(io_err(&p))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// Collects the saves of `opts` over `corpus` into the folder `out` (created if needed), resuming
/// after the last complete shard when `out` already holds a run of the same job; refuses a folder
/// holding a different job (another model, other saves, positions, truncation, tokenizer or
/// corpus). See the [module documentation](self) for the layout.
pub fn collect(
    model: &Model,
    corpus: &Corpus,
    out: &Path,
    opts: &CollectOptions,
) -> Result<Summary> {
    let start = Instant::now();
    if opts.saves.is_empty() {
        return Err(Error::Input(
            "nothing to collect: give at least one save (a standard name such as `layers_output.0`, or a hookpoint path)".into(),
        ));
    }
    if opts.batch_size == 0 || opts.shard_documents == 0 {
        return Err(Error::Input(
            "the batch size and the documents per shard must be at least 1".into(),
        ));
    }
    for s in &opts.saves {
        if RESERVED.contains(&s.as_str()) {
            return Err(Error::Input(format!(
                "`{s}` names the bookkeeping tensor of every shard; it cannot be a save"
            )));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for s in &opts.saves {
        if !seen.insert(s) {
            return Err(Error::Input(format!("`{s}` is saved twice")));
        }
    }
    if same_dir(out, &model.source) || out.starts_with(&model.source) {
        return Err(Error::Output {
            path: out.to_path_buf(),
            msg: "refusing to write into the model's folder; choose another folder".into(),
        });
    }
    if let Some(k) = opts.top_k {
        if k == 0 {
            return Err(Error::Input("top-k must be at least 1".into()));
        }
        if !opts.saves.iter().any(|s| is_feature_acts(s)) {
            return Err(Error::Input(format!(
                "top-k keeps the largest SAE features of each row, but no save is an SAE's feature activations (`H.sae.feature_acts`; saves: {})",
                opts.saves.join(", ")
            )));
        }
    }
    // The plan, resolved once for every batch (bad paths fail here, before the corpus is read):
    // the SAEs, then the clamps (which may edit their features), then the saves.
    let mut pb = model.plan();
    let mut sae_records = Vec::new();
    for a in &opts.saes {
        sae_records.push(sae_record(a)?);
        pb = pb.sae(a.clone())?;
    }
    for c in &opts.clamps {
        pb = pb.clamp(&c.name, c.index, c.value)?;
    }
    for s in &opts.saves {
        pb = pb.save(s)?;
    }
    let plan: Plan = pb.build();
    let tokenizer_sha256 = tokenizer_hash(model)?;
    let max_tokens = match (opts.max_tokens, model.max_positions()) {
        (Some(0), _) => return Err(Error::Input("max tokens must be at least 1".into())),
        (Some(n), Some(m)) if n > m => {
            return Err(Error::Input(format!(
                "max tokens {n} is more than the {m} positions this model supports"
            )))
        }
        (Some(n), _) => Some(n),
        (None, m) => m,
    };
    let (records, dataset_sha256) = corpus.scan()?;
    let range = opts.shard.map(|s| s.range(records)).unwrap_or(0..records);
    let revision = match model.source.parent().and_then(|p| p.file_name()) {
        Some(n) if n == "snapshots" => model
            .source
            .file_name()
            .map(|c| c.to_string_lossy().into_owned()),
        _ => opts.revision.clone(),
    };
    let fresh = Manifest {
        format: FORMAT.into(),
        model: opts.model_id.clone(),
        model_type: model.arch.model_type.to_string(),
        revision,
        dtype: dtype_name(model.dtype),
        saves: opts.saves.clone(),
        positions: opts.positions,
        max_tokens,
        tokenizer_sha256,
        dataset: corpus.path.display().to_string(),
        dataset_sha256,
        field: corpus.field.clone(),
        records,
        shard: opts.shard,
        record_range: [range.start, range.end],
        shard_documents: opts.shard_documents,
        parts: vec![],
        documents: 0,
        tokens: 0,
        finished: false,
        saes: sae_records,
        clamps: opts.clamps.iter().map(|c| c.to_string()).collect(),
        top_k: opts.top_k,
    };

    let created_dir = !out.exists();
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let manifest_path = out.join("manifest.json");
    crate::hub::check_output_path(&manifest_path, &model.source)?;
    let new_manifest = !manifest_path.exists();
    let mut man = if !new_manifest {
        let old = Manifest::read(out)?;
        if let Some((what, was, now)) = old.differs(&fresh) {
            return Err(Error::Output {
                path: out.to_path_buf(),
                msg: format!(
                    "holds a collection made with different {what} ({was}; here {now}); use another folder, or delete this one to start over"
                ),
            });
        }
        if old.shard != fresh.shard || old.shard_documents != fresh.shard_documents {
            return Err(Error::Output {
                path: out.to_path_buf(),
                msg: format!(
                    "holds a collection split differently (shard {}, {} documents a shard; now shard {}, {}); use another folder",
                    shard_str(old.shard),
                    old.shard_documents,
                    shard_str(fresh.shard),
                    fresh.shard_documents
                ),
            });
        }
        for p in &old.parts {
            if !out.join(&p.file).is_file() {
                return Err(Error::Output {
                    path: out.join(&p.file),
                    msg: "is listed in manifest.json but missing; delete the folder to start over"
                        .into(),
                });
            }
        }
        old
    } else {
        fresh
    };
    // Anything not in the manifest is from an interrupted run: temporary files, and a part renamed
    // just before the manifest could list it. Both are redone.
    let listed: std::collections::HashSet<String> =
        man.parts.iter().map(|p| p.file.clone()).collect();
    let entries = std::fs::read_dir(out).map_err(io_err(out))?;
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let stale_tmp = n.starts_with(".part-") && n.ends_with(".tmp");
        if stale_tmp || (is_part_name(&n) && !listed.contains(&n)) {
            std::fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
        }
    }
    man.write(out)?;
    let resumed_parts = man.parts.len();
    let mut summary = Summary {
        out: out.to_path_buf(),
        documents: man.documents,
        tokens: man.tokens,
        parts: man.parts.len(),
        resumed_parts,
        new_documents: 0,
        new_tokens: 0,
        seconds: 0.0,
    };
    if man.finished {
        summary.seconds = start.elapsed().as_secs_f64();
        return Ok(summary);
    }
    let resume_at = man
        .parts
        .last()
        .map(|p| p.end_record)
        .unwrap_or(range.start);
    let r = run_corpus(
        model,
        &plan,
        corpus,
        out,
        opts,
        max_tokens,
        range,
        resume_at,
        &mut man,
        &mut summary,
        start,
    );
    if r.is_err() && new_manifest && man.parts.is_empty() {
        // Nothing was collected (a bad save, an unreadable corpus): leave no trace of this job, so
        // that a corrected command can use the folder.
        let _ = std::fs::remove_file(&manifest_path);
        if created_dir {
            let _ = std::fs::remove_dir(out);
        }
    }
    r?;
    summary.documents = man.documents;
    summary.tokens = man.tokens;
    summary.parts = man.parts.len();
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// The loop of [`collect`] from record `resume_at` on.
#[allow(clippy::too_many_arguments)]
fn run_corpus(
    model: &Model,
    plan: &Plan,
    corpus: &Corpus,
    out: &Path,
    opts: &CollectOptions,
    max_tokens: Option<usize>,
    range: std::ops::Range<usize>,
    resume_at: usize,
    man: &mut Manifest,
    summary: &mut Summary,
    start: Instant,
) -> Result<()> {
    let tokenizer = model.tokenizer.as_ref().ok_or_else(|| Error::Tokenizer {
        path: model.source.join("tokenizer.json"),
        msg: "missing: collecting over a text corpus needs the model's tokenizer.json".into(),
    })?;

    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(range.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} documents  {msg}  elapsed {elapsed}, ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position((resume_at - range.start) as u64);
        b.reset_eta();
        b
    } else {
        indicatif::ProgressBar::hidden()
    };

    let nsaves = opts.saves.len();
    let mut buf = Buffer::new(nsaves);
    let top_k: Vec<Option<usize>> = opts
        .saves
        .iter()
        .map(|s| opts.top_k.filter(|_| is_feature_acts(s)))
        .collect();
    let mut batch: Vec<(usize, Vec<u32>)> = Vec::with_capacity(opts.batch_size);
    // Skip to where this run starts (other shards' records and complete parts), undecoded.
    let mut records = corpus.records()?;
    let mut next_record = records.skip_records(resume_at)?;
    let mut records_iter = records.enumerate().map(|(i, r)| (i + resume_at, r));
    let pad = model.pad_id();
    loop {
        // Fill a batch that does not cross a shard boundary.
        let room = (opts.shard_documents - buf.index.len()).min(opts.batch_size);
        let mut exhausted = false;
        while batch.len() < room {
            if next_record >= range.end {
                exhausted = true;
                break;
            }
            let Some((i, text)) = records_iter.next() else {
                exhausted = true;
                break;
            };
            next_record = i + 1;
            let text = text?;
            let enc = tokenizer.encode(text.as_str(), true).map_err(|e| {
                Error::Input(format!(
                    "{}: record {i}: cannot tokenize: {e}",
                    corpus.path.display()
                ))
            })?;
            let mut ids = enc.get_ids().to_vec();
            if let Some(m) = max_tokens {
                ids.truncate(m);
            }
            if ids.is_empty() {
                bar.inc(1); // no tokens (an empty line): nothing to save
                continue;
            }
            batch.push((i, ids));
        }
        if !batch.is_empty() {
            let n = run_batch(
                model,
                plan,
                &opts.saves,
                &top_k,
                opts.positions,
                pad,
                &batch,
                &mut buf,
            )?;
            summary.new_documents += batch.len();
            summary.new_tokens += n;
            bar.inc(batch.len() as u64);
            bar.set_message(format!(
                "{:.0} tokens/s",
                summary.new_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9)
            ));
            batch.clear();
        }
        let full = buf.index.len() >= opts.shard_documents;
        if (full || exhausted) && !buf.index.is_empty() {
            let file = part_name(man.parts.len());
            let path = out.join(&file);
            crate::hub::check_output_path(&path, &model.source)?;
            let bytes = serialize(&opts.saves, &top_k, &buf, opts.positions)?;
            write_atomic(&path, &bytes)?;
            drop(bytes);
            let tokens: usize = buf.tokens.iter().map(|&t| t as usize).sum();
            man.parts.push(Part {
                file,
                documents: buf.index.len(),
                tokens,
                end_record: next_record,
            });
            man.documents += buf.index.len();
            man.tokens += tokens;
            buf.clear();
            if exhausted {
                man.finished = true;
            }
            man.write(out)?;
        }
        if exhausted {
            if !man.finished {
                man.finished = true;
                man.write(out)?;
            }
            break;
        }
    }
    bar.finish_and_clear();
    Ok(())
}

fn shard_str(s: Option<Shard>) -> String {
    s.map(|s| format!("{}/{}", s.index, s.count))
        .unwrap_or_else(|| "none".into())
}

/// One left-padded forward over `batch`; appends each document's values to `buf`. Returns the
/// number of real tokens.
#[allow(clippy::too_many_arguments)]
fn run_batch(
    model: &Model,
    plan: &Plan,
    saves: &[String],
    top_k: &[Option<usize>],
    positions: Positions,
    pad: u32,
    batch: &[(usize, Vec<u32>)],
    buf: &mut Buffer,
) -> Result<usize> {
    let b = batch.len();
    let t = batch.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    for (_, s) in batch {
        ids.extend(std::iter::repeat_n(pad, t - s.len()));
        mask.extend(std::iter::repeat_n(0u32, t - s.len()));
        ids.extend_from_slice(s);
        mask.extend(std::iter::repeat_n(1u32, s.len()));
    }
    let input = Input::Ids {
        input_ids: Tensor::from_vec(ids, (b, t), &model.device)?,
        attention_mask: Some(Tensor::from_vec(mask, (b, t), &model.device)?),
        position_ids: None, // from the mask: each row as if alone
    };
    let res = model.run_plan(plan, &input)?;
    for (k, name) in saves.iter().enumerate() {
        let v = res.get(name)?;
        let dims = v.dims().to_vec();
        if dims.len() < 2 || dims[0] != b || dims[1] != t {
            return Err(Error::Input(format!(
                "`{name}` has shape {dims:?} on a batch of {b} x {t} tokens; collect takes values of shape [batch, tokens, ...] (hidden states, logits, a module's output)"
            )));
        }
        let mut rest = dims[2..].to_vec();
        if let Some(kk) = top_k[k] {
            if rest.len() != 1 {
                return Err(Error::Input(format!(
                    "`{name}` has shape {dims:?}; top-k takes values of shape [batch, tokens, features]"
                )));
            }
            if kk > rest[0] {
                return Err(Error::Input(format!(
                    "top-k {kk} is more than the {} features of `{name}`",
                    rest[0]
                )));
            }
            rest = vec![kk];
        }
        match &buf.rest[k] {
            None => buf.rest[k] = Some(rest),
            Some(r) if *r != rest => {
                return Err(Error::Input(format!(
                    "`{name}` changed shape between documents ({r:?}, then {rest:?} after the token dimension)"
                )))
            }
            Some(_) => {}
        }
        let v = v.to_dtype(DType::F32)?;
        for (row, (_, s)) in batch.iter().enumerate() {
            let l = s.len();
            let x = v.get(row)?.narrow(0, t - l, l)?;
            let x = match positions {
                Positions::All => x,
                Positions::Last => x.narrow(0, l - 1, 1)?,
                Positions::Mean => x.mean_keepdim(0)?,
            };
            if let Some(kk) = top_k[k] {
                let (vals, idx) = Sae::top_k(&x, kk)?;
                buf.values[k].extend(vals.flatten_all()?.to_vec1::<f32>()?);
                buf.indices[k].extend(idx.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?);
                continue;
            }
            buf.values[k].extend(x.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    let mut n = 0;
    for (i, s) in batch {
        buf.index.push(*i as i64);
        buf.tokens.push(s.len() as i64);
        n += s.len();
    }
    Ok(n)
}

/// Merges the folders of a run split with [`Shard`] (`I/N` for every I, each finished) into `out`:
/// checks that their manifests agree (model, saves, positions, tokenizer, corpus, N), links
/// (hard links; copies across file systems) their parts into `out` renumbered in corpus order,
/// and writes one manifest over all of them. `out` must be new or empty.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<Summary> {
    let start = Instant::now();
    if dirs.is_empty() {
        return Err(Error::Input(
            "nothing to merge: give the shards' folders".into(),
        ));
    }
    let mut mans = Vec::new();
    for d in dirs {
        if same_dir(d, out) {
            return Err(Error::Output {
                path: out.to_path_buf(),
                msg: "is one of the folders being merged; choose a new folder".into(),
            });
        }
        let m = Manifest::read(d)?;
        if !m.finished {
            return Err(Error::Output {
                path: d.clone(),
                msg: format!(
                    "is not finished ({} documents so far); run its collect command again to complete it",
                    m.documents
                ),
            });
        }
        mans.push((d.clone(), m));
    }
    let first = mans[0].1.clone();
    let n = first.shard.map(|s| s.count).unwrap_or(1);
    for (d, m) in &mans[1..] {
        if let Some((what, a, b)) = first.differs(m) {
            return Err(Error::Output {
                path: d.clone(),
                msg: format!(
                    "was collected with different {what} than {} ({b}; there {a}); only shards of one job merge",
                    mans[0].0.display()
                ),
            });
        }
    }
    let mut by_index: Vec<Option<usize>> = vec![None; n];
    for (k, (d, m)) in mans.iter().enumerate() {
        let (i, c) = m.shard.map(|s| (s.index, s.count)).unwrap_or((0, 1));
        if c != n {
            return Err(Error::Output {
                path: d.clone(),
                msg: format!(
                    "is shard {i}/{c}, but {} is one of {n}",
                    mans[0].0.display()
                ),
            });
        }
        if by_index[i].is_some() {
            return Err(Error::Output {
                path: d.clone(),
                msg: format!("shard {i}/{n} is given twice"),
            });
        }
        by_index[i] = Some(k);
    }
    if let Some(missing) = by_index.iter().position(|x| x.is_none()) {
        return Err(Error::Input(format!(
            "shard {missing}/{n} is missing: give the folders of all {n} shards"
        )));
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let busy = std::fs::read_dir(out)
        .map_err(io_err(out))?
        .flatten()
        .any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n == "manifest.json" || is_part_name(&n)
        });
    if busy {
        return Err(Error::Output {
            path: out.to_path_buf(),
            msg: "already holds a collection; merge into a new or empty folder".into(),
        });
    }
    let mut merged = Manifest {
        shard: None,
        record_range: [0, first.records],
        parts: vec![],
        documents: 0,
        tokens: 0,
        finished: true,
        ..first
    };
    for k in by_index.into_iter().flatten() {
        let (d, m) = &mans[k];
        for p in &m.parts {
            let file = part_name(merged.parts.len());
            let src = d.join(&p.file);
            let dst = out.join(&file);
            let tmp = out.join(format!(".{file}.tmp"));
            let _ = std::fs::remove_file(&tmp);
            if std::fs::hard_link(&src, &tmp).is_err() {
                std::fs::copy(&src, &tmp).map_err(io_err(&src))?;
            }
            std::fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
            merged.documents += p.documents;
            merged.tokens += p.tokens;
            merged.parts.push(Part { file, ..p.clone() });
        }
    }
    merged.write(out)?;
    Ok(Summary {
        out: out.to_path_buf(),
        documents: merged.documents,
        tokens: merged.tokens,
        parts: merged.parts.len(),
        resumed_parts: 0,
        new_documents: 0,
        new_tokens: 0,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ranges_cover_the_corpus() {
        for records in [0usize, 1, 7, 100, 101] {
            for n in 1..6 {
                let mut next = 0;
                for i in 0..n {
                    let r = Shard { index: i, count: n }.range(records);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, records);
            }
        }
        assert!("3/3".parse::<Shard>().is_err());
        assert!("1/0".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
        assert_eq!(
            "2/4".parse::<Shard>().ok(),
            Some(Shard { index: 2, count: 4 })
        );
    }
}
