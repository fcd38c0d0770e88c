//! Finding and reading checkpoints: a local folder, or a hub id resolved in the local Hugging Face
//! cache and, when it is not there, downloaded from the Hugging Face Hub into that cache
//! ([`download`]).

use crate::{Error, Result};
use std::path::{Path, PathBuf};

pub mod download;

pub use download::{download, download_files, HubOptions};

/// Where the cache is looked for, in order: `HF_HUB_CACHE`, `HF_HOME/hub`,
/// `XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub`. Downloads go to the first.
pub fn cache_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        v.push(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        v.push(PathBuf::from(p).join("hub"));
    }
    if let Ok(p) = std::env::var("XDG_CACHE_HOME") {
        v.push(PathBuf::from(p).join("huggingface/hub"));
    }
    if let Ok(h) = std::env::var("HOME") {
        v.push(PathBuf::from(h).join(".cache/huggingface/hub"));
    }
    v
}

/// Whether MODEL names a hub repository (`owner/name` or `name`) rather than a path.
pub(crate) fn looks_like_id(model: &str) -> bool {
    !model.is_empty()
        && !model.starts_with('.')
        && !model.starts_with('/')
        && model.matches('/').count() <= 1
        && model.split('/').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The cache folder of a repository: `models--owner--name`.
pub(crate) fn repo_folder(model: &str) -> String {
    format!("models--{}", model.replace('/', "--"))
}

/// Whether a revision is a full commit hash.
pub(crate) fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// Whether a snapshot folder holds a loadable checkpoint (config.json and all weights).
pub(crate) fn is_complete(snap: &Path) -> bool {
    snap.join("config.json").is_file() && weight_files(snap).is_ok()
}

/// The snapshot of `revision` in one cache folder: `refs/<revision>` names the commit (a commit
/// hash is its own); with the default revision and no refs file, the newest snapshot.
fn cached_snapshot(repo: &Path, revision: Option<&str>) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    let rev = revision.unwrap_or("main");
    // A revision names a file under refs/ (`main`, `refs/pr/1`), never a path out of it.
    if !Path::new(rev)
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    let commit = if is_commit(rev) {
        Some(rev.to_string())
    } else {
        std::fs::read_to_string(repo.join("refs").join(rev))
            .ok()
            .map(|s| s.trim().to_string())
    };
    if let Some(c) = commit {
        let snap = snapshots.join(&c);
        if snap.is_dir() {
            return Some(snap);
        }
    }
    if revision.is_some() {
        return None;
    }
    // No refs/main: take the newest snapshot.
    let rd = std::fs::read_dir(&snapshots).ok()?;
    let mut snaps: Vec<_> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    snaps.sort_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    snaps.pop()
}

/// Resolves MODEL with the settings of the environment (see [`HubOptions::from_env`]): an
/// existing folder, a hub id in the local cache, or a hub id downloaded into it.
pub fn resolve(model: &str) -> Result<PathBuf> {
    resolve_with(model, &HubOptions::from_env())
}

/// Resolves MODEL: an existing folder; else a hub id (`owner/name`) whose snapshot of
/// `opts.revision` (default `main`) is complete in a local cache
/// (`models--owner--name/snapshots/<refs/REVISION>`); else, unless offline, the hub id downloaded
/// into the first cache folder ([`download`]).
pub fn resolve_with(model: &str, opts: &HubOptions) -> Result<PathBuf> {
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        return Err(Error::ModelNotFound {
            model: model.into(),
            msg: "it is a file; give the folder that holds config.json".into(),
        });
    }
    let id = looks_like_id(model);
    let mut looked = Vec::new();
    let mut partial = None;
    if id {
        let folder = repo_folder(model);
        for dir in &opts.cache_dirs {
            let repo = dir.join(&folder);
            looked.push(repo.display().to_string());
            if !repo.is_dir() {
                continue;
            }
            if let Some(snap) = cached_snapshot(&repo, opts.revision.as_deref()) {
                if is_complete(&snap) {
                    return Ok(snap);
                }
                partial.get_or_insert(snap);
            }
        }
    }
    if id && !opts.offline && !opts.cache_dirs.is_empty() {
        return download(model, opts);
    }
    // Offline: an incomplete snapshot is still returned, so that the loader names what is missing.
    if let Some(snap) = partial {
        return Ok(snap);
    }
    let rev = match &opts.revision {
        Some(r) => format!(" at revision `{r}`"),
        None => String::new(),
    };
    Err(Error::ModelNotFound {
        model: model.into(),
        msg: if id && looked.is_empty() {
            "no such folder, and no Hugging Face cache folder is known (HF_HUB_CACHE, HF_HOME and HOME are unset)"
                .into()
        } else if id {
            format!(
                "no such folder, and not in the local Hugging Face cache{rev} (looked in {}); \
                 nothing is downloaded while HF_HUB_OFFLINE is set",
                looked.join(", ")
            )
        } else {
            "no such folder".into()
        },
    })
}

/// The shard files named by a `model.safetensors.index.json`, in order of first appearance,
/// validated: file names inside the checkpoint folder, safetensors only.
pub fn index_shards(index: &Path, text: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Weights {
        path: index.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Weights {
            path: index.to_path_buf(),
            msg: "no `weight_map` object".into(),
        })?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, f) in map {
        let f = f.as_str().ok_or_else(|| Error::Weights {
            path: index.to_path_buf(),
            msg: format!("weight_map entry for `{tensor}` is not a file name"),
        })?;
        // Shards are files inside the checkpoint folder, and safetensors only: an index must
        // not make us read outside the folder or load a pickle.
        let rel = Path::new(f);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(Error::Weights {
                path: index.to_path_buf(),
                msg: format!("weight_map entry for `{tensor}` names `{f}`, which is not a file inside the checkpoint folder"),
            });
        }
        if !f.ends_with(".safetensors") {
            return Err(Error::Weights {
                path: index.to_path_buf(),
                msg: format!(
                    "weight_map entry for `{tensor}` names `{f}`, which is not a .safetensors file (pickle checkpoints are never loaded: they can run code)"
                ),
            });
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
    }
    if files.is_empty() {
        return Err(Error::Weights {
            path: index.to_path_buf(),
            msg: "`weight_map` lists no tensors".into(),
        });
    }
    Ok(files)
}

/// The safetensors files of a checkpoint folder: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::Io {
            path: index.clone(),
            source: e,
        })?;
        let files = index_shards(&index, &text)?;
        let mut out = Vec::new();
        for f in files {
            let p = dir.join(&f);
            if !p.is_file() {
                return Err(Error::Weights {
                    path: index.clone(),
                    msg: format!("lists shard `{f}`, which is missing from {}", dir.display()),
                });
            }
            out.push(p);
        }
        return Ok(out);
    }
    let other: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let hint = if other
        .iter()
        .any(|f| f.ends_with(".bin") || f.ends_with(".pt") || f.ends_with(".pth"))
    {
        " (pickle checkpoints are never loaded: they can run code; convert to safetensors)"
    } else {
        ""
    };
    Err(Error::Weights {
        path: dir.to_path_buf(),
        msg: format!("no model.safetensors or model.safetensors.index.json{hint}"),
    })
}

/// Where one tensor of a checkpoint is stored, and what its header says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The safetensors file holding it.
    pub file: PathBuf,
    /// Its stored dtype, as safetensors names it (`F32`, `I64`, ...).
    pub dtype: String,
    /// Its stored shape.
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Whether the stored dtype is a floating-point type that converts to the compute dtype
    /// without losing meaning (integer or quantized data converted to float would silently
    /// compute something else).
    pub fn is_float(&self) -> bool {
        matches!(self.dtype.as_str(), "F16" | "BF16" | "F32" | "F64")
    }
}

/// Every tensor of a checkpoint by name, read from the safetensors headers only.
pub type TensorIndex = std::collections::HashMap<String, TensorInfo>;

/// Reads and validates the header of every weight file, so that a truncated or corrupt file is
/// reported by name before anything is built, and returns where each tensor is.
pub fn read_headers(files: &[PathBuf]) -> Result<TensorIndex> {
    let mut index = TensorIndex::new();
    for f in files {
        let file = std::fs::File::open(f).map_err(|e| Error::Io {
            path: f.clone(),
            source: e,
        })?;
        // SAFETY: a read-only mapping of a file we just opened, dropped at the end of this
        // iteration. `SafeTensors::deserialize` bounds-checks the header and every tensor's
        // offsets against the mapping's length. A file truncated by another process while mapped
        // is outside what any mmap-based loader can guard against (see `Model::load`).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Io {
            path: f.clone(),
            source: e,
        })?;
        let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| Error::Weights {
            path: f.clone(),
            msg: format!("not a valid safetensors file ({e}); is it truncated or corrupt?"),
        })?;
        for (name, view) in st.tensors() {
            index.insert(
                name,
                TensorInfo {
                    file: f.clone(),
                    dtype: format!("{:?}", view.dtype()),
                    shape: view.shape().to_vec(),
                },
            );
        }
    }
    Ok(index)
}

/// Checks that every weight file is a readable safetensors file with a sound header, so that a
/// truncated or corrupt file is reported by name before anything is built.
pub fn check_safetensors(files: &[PathBuf]) -> Result<()> {
    read_headers(files).map(|_| ())
}

/// Whether raw little-endian floating-point data holds a NaN or an infinity (all exponent bits
/// set). `None` for dtypes that cannot (integers) or that are not checked.
fn has_non_finite(dtype: safetensors::Dtype, data: &[u8]) -> Option<bool> {
    use safetensors::Dtype as D;
    // A branch-free OR over the data, which the compiler vectorizes: a few GB/s per core.
    fn scan<const N: usize>(data: &[u8], mask: u64) -> bool {
        data.chunks_exact(N).fold(false, |acc, c| {
            let mut b = [0u8; 8];
            b[..N].copy_from_slice(c);
            acc | (u64::from_le_bytes(b) & mask == mask)
        })
    }
    Some(match dtype {
        D::F32 => scan::<4>(data, 0x7f80_0000),
        D::BF16 => scan::<2>(data, 0x7f80),
        D::F16 => scan::<2>(data, 0x7c00),
        D::F64 => scan::<8>(data, 0x7ff0_0000_0000_0000),
        _ => return None,
    })
}

/// Names of the floating-point tensors of these safetensors files that hold NaN or infinity, in
/// file order. One pass over the (memory-mapped) data, which also brings it into the page cache
/// for the load that follows.
pub fn non_finite_tensors(files: &[PathBuf]) -> Result<Vec<(String, PathBuf)>> {
    let mut bad = Vec::new();
    for f in files {
        let file = std::fs::File::open(f).map_err(|e| Error::Io {
            path: f.clone(),
            source: e,
        })?;
        // SAFETY: a read-only mapping of a file we just opened, dropped at the end of this
        // iteration; `SafeTensors::deserialize` bounds-checks every tensor against its length.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Io {
            path: f.clone(),
            source: e,
        })?;
        let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| Error::Weights {
            path: f.clone(),
            msg: format!("not a valid safetensors file ({e}); is it truncated or corrupt?"),
        })?;
        let mut names: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in names {
            if has_non_finite(view.dtype(), view.data()) == Some(true) {
                bad.push((name, f.clone()));
            }
        }
    }
    Ok(bad)
}

/// Refuses an output path that is, or links to, a file of the checkpoint folder `model_dir`
/// (config, weights, tokenizer; the same file by device and inode, so symbolic and hard links and
/// the blobs of a hub cache snapshot count too): writing it would destroy the model.
pub fn check_output_path(out: &Path, model_dir: &Path) -> Result<()> {
    let Ok(out_meta) = std::fs::metadata(out) else {
        return Ok(()); // does not exist (or a dangling link): nothing loaded is there
    };
    let same = |m: &std::fs::Metadata| -> bool {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            m.dev() == out_meta.dev() && m.ino() == out_meta.ino()
        }
        #[cfg(not(unix))]
        {
            let _ = m;
            false
        }
    };
    let canon_out = std::fs::canonicalize(out).ok();
    let Ok(rd) = std::fs::read_dir(model_dir) else {
        return Ok(());
    };
    let mut stack: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            // One level of subfolders (tokenizer files in a subfolder); no deeper walks.
            if p.parent() == Some(model_dir) {
                if let Ok(rd) = std::fs::read_dir(&p) {
                    stack.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()));
                }
            }
            continue;
        }
        if same(&m) || (canon_out.is_some() && std::fs::canonicalize(&p).ok() == canon_out) {
            return Err(Error::Output {
                path: out.to_path_buf(),
                msg: format!(
                    "refusing to write it: it is {} of the model being loaded, which writing would destroy; choose another file",
                    if p.file_name() == out.file_name() {
                        format!("the file {}", p.display())
                    } else {
                        format!("the same file as {}", p.display())
                    }
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::has_non_finite;
    use safetensors::Dtype as D;

    #[test]
    fn non_finite_bit_patterns() {
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert_eq!(
            has_non_finite(D::F32, &f32s(&[1.0, -3e38, 0.0])),
            Some(false)
        );
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(has_non_finite(D::F32, &f32s(&[1.0, bad])), Some(true));
        }
        // bfloat16 and float16: the high half of a float32 / IEEE half.
        assert_eq!(
            has_non_finite(D::BF16, &[0x80, 0x3f, 0x7f, 0x7f]),
            Some(false)
        ); // 1.0, max
        assert_eq!(
            has_non_finite(D::BF16, &[0x80, 0x3f, 0xc0, 0x7f]),
            Some(true)
        ); // NaN
        assert_eq!(
            has_non_finite(D::F16, &[0x00, 0x3c, 0xff, 0x7b]),
            Some(false)
        ); // 1.0, max
        assert_eq!(has_non_finite(D::F16, &[0x00, 0x7c]), Some(true)); // inf
        assert_eq!(has_non_finite(D::F64, &f64::NAN.to_le_bytes()), Some(true));
        assert_eq!(has_non_finite(D::I64, &[0xff; 8]), None);
    }
}
