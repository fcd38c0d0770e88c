//! Finding and reading checkpoints: a local folder, or a hub id resolved offline in the local
//! Hugging Face cache.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Where the cache is looked for, in order: `HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`.
pub fn cache_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        v.push(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        v.push(PathBuf::from(p).join("hub"));
    }
    if let Ok(h) = std::env::var("HOME") {
        v.push(PathBuf::from(h).join(".cache/huggingface/hub"));
    }
    v
}

/// Resolves MODEL: an existing folder, or a hub id (`owner/name`) in the local cache
/// (`models--owner--name/snapshots/<refs/main>`).
pub fn resolve(model: &str) -> Result<PathBuf> {
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
    let looks_like_id =
        !model.starts_with('.') && !model.starts_with('/') && model.matches('/').count() <= 1;
    let mut looked = Vec::new();
    if looks_like_id {
        let folder = format!("models--{}", model.replace('/', "--"));
        for dir in cache_dirs() {
            let repo = dir.join(&folder);
            looked.push(repo.display().to_string());
            if !repo.is_dir() {
                continue;
            }
            let snapshots = repo.join("snapshots");
            let rev = std::fs::read_to_string(repo.join("refs/main"))
                .ok()
                .map(|s| s.trim().to_string());
            if let Some(rev) = rev {
                let snap = snapshots.join(&rev);
                if snap.is_dir() {
                    return Ok(snap);
                }
            }
            // No refs/main: take the only (or newest) snapshot.
            if let Ok(rd) = std::fs::read_dir(&snapshots) {
                let mut snaps: Vec<_> = rd
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect();
                snaps.sort_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
                if let Some(s) = snaps.pop() {
                    return Ok(s);
                }
            }
        }
    }
    Err(Error::ModelNotFound {
        model: model.into(),
        msg: if looks_like_id && looked.is_empty() {
            "no such folder, and no Hugging Face cache folder is known (HF_HUB_CACHE, HF_HOME and HOME are unset); \
             nnscope never downloads"
                .into()
        } else if looks_like_id {
            format!(
                "no such folder, and not in the local Hugging Face cache (looked in {}); nnscope never downloads",
                looked.join(", ")
            )
        } else {
            "no such folder".into()
        },
    })
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
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Weights {
            path: index.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Weights {
                path: index.clone(),
                msg: "no `weight_map` object".into(),
            })?;
        let mut files: Vec<String> = Vec::new();
        for (tensor, f) in map {
            let f = f.as_str().ok_or_else(|| Error::Weights {
                path: index.clone(),
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
                    path: index.clone(),
                    msg: format!("weight_map entry for `{tensor}` names `{f}`, which is not a file inside the checkpoint folder"),
                });
            }
            if !f.ends_with(".safetensors") {
                return Err(Error::Weights {
                    path: index.clone(),
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
                path: index.clone(),
                msg: "`weight_map` lists no tensors".into(),
            });
        }
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
