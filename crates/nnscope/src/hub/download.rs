//! Downloads from the Hugging Face Hub into the standard cache, as `huggingface_hub` lays it out:
//!
//! ```text
//! models--owner--name/
//!   blobs/<etag>                 one file per content: the sha256 of an LFS file, the git hash of others
//!   snapshots/<commit>/<file>    relative symlinks into blobs/ (copies where links are impossible)
//!   refs/<revision>              the commit a branch or tag pointed at when it was downloaded
//! ```
//!
//! so that transformers and nnscope share one cache. Only what a model needs is fetched: config.json,
//! generation_config.json, the tokenizer files, and `model.safetensors` or the shards named by
//! `model.safetensors.index.json`. Pickle files (`pytorch_model.bin`, ...) are never downloaded.
//!
//! Each file is first asked for with `HEAD /{repo}/resolve/{commit}/{file}` (not following a
//! redirect to another host: its headers carry `X-Linked-Etag`, the sha256 of an LFS file, and
//! `X-Linked-Size`), then fetched into `blobs/<etag>.incomplete`, resumed with a `Range` request
//! when a previous attempt was cut, checked against the sha256 (LFS files) or the size, and renamed.

use super::{index_shards, is_commit, looks_like_id, repo_folder};
use crate::error::HubErrorKind as K;
use crate::{Error, Result};
use sha2::Digest;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where and how to reach the Hugging Face Hub, and where the cache is.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The hub's address, without a trailing slash (`HF_ENDPOINT`; default `https://huggingface.co`).
    pub endpoint: String,
    /// Cache folders looked in, in order; downloads go to the first ([`super::cache_dirs`]).
    pub cache_dirs: Vec<PathBuf>,
    /// Access token for gated and private repositories (`HF_TOKEN`, else the token file).
    pub token: Option<String>,
    /// Use the local cache only (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Branch, tag or commit to load (default `main`).
    pub revision: Option<String>,
    /// Show a progress bar per downloaded file.
    pub progress: bool,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self::from_env()
    }
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "on" | "yes" | "true"
    )
}

/// The token as `huggingface_hub` finds it: `HF_TOKEN`, else the file at `HF_TOKEN_PATH`, else
/// `HF_HOME/token`, else `~/.cache/huggingface/token`.
pub fn token_from_env() -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN") {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Some(t);
        }
    }
    let file = if let Ok(p) = std::env::var("HF_TOKEN_PATH") {
        PathBuf::from(p)
    } else if let Ok(h) = std::env::var("HF_HOME") {
        PathBuf::from(h).join("token")
    } else if let Ok(x) = std::env::var("XDG_CACHE_HOME") {
        PathBuf::from(x).join("huggingface/token")
    } else if let Ok(h) = std::env::var("HOME") {
        PathBuf::from(h).join(".cache/huggingface/token")
    } else {
        return None;
    };
    let t = std::fs::read_to_string(file).ok()?.trim().to_string();
    (!t.is_empty()).then_some(t)
}

impl HubOptions {
    /// Settings from the environment, as `huggingface_hub` reads them: `HF_ENDPOINT`,
    /// `HF_HUB_CACHE` / `HF_HOME` / `XDG_CACHE_HOME` / `HOME`, `HF_TOKEN` or the token file,
    /// `HF_HUB_OFFLINE`. Revision `main`, no progress bars.
    pub fn from_env() -> Self {
        HubOptions {
            endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().trim_end_matches('/').to_string())
                .unwrap_or_else(|| "https://huggingface.co".into()),
            cache_dirs: super::cache_dirs(),
            token: token_from_env(),
            offline: std::env::var("HF_HUB_OFFLINE")
                .map(|v| truthy(&v))
                .unwrap_or(false),
            revision: None,
            progress: false,
        }
    }
}

/// Tokenizer and config files fetched when the repository has them.
const SMALL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
];

/// Extensions of pickle (or otherwise code-running) checkpoints, never downloaded.
const PICKLE: &[&str] = &[".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"];

struct Ctx<'a> {
    repo: &'a str,
    opts: &'a HubOptions,
    agent: ureq::Agent,
}

impl Ctx<'_> {
    fn err(&self, kind: K, msg: impl Into<String>) -> Error {
        Error::Hub {
            repo: self.repo.to_string(),
            kind,
            msg: msg.into(),
        }
    }

    fn network(&self, url: &str, e: impl std::fmt::Display) -> Error {
        self.err(
            K::Network,
            format!(
                "cannot reach {} ({url}: {e}); check the network (HF_ENDPOINT sets the address), \
                 or set HF_HUB_OFFLINE=1 to use only the local cache",
                self.opts.endpoint
            ),
        )
    }

    fn cache_err(&self, path: &Path, e: impl std::fmt::Display) -> Error {
        self.err(K::Cache, format!("{}: {e}", path.display()))
    }

    /// One request; `Ok` for any status below 400 (redirects are not followed here).
    fn send(
        &self,
        method: &str,
        url: &str,
        range_from: Option<u64>,
    ) -> Result<std::result::Result<ureq::Response, (u16, ureq::Response)>> {
        let mut req = self
            .agent
            .request(method, url)
            .set("User-Agent", concat!("nnscope/", env!("CARGO_PKG_VERSION")))
            .set("Accept-Encoding", "identity");
        // The token goes to the hub only, never to the storage host a file redirects to.
        if let Some(t) = &self.opts.token {
            if same_origin(url, &self.opts.endpoint) {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
        }
        if let Some(n) = range_from {
            req = req.set("Range", &format!("bytes={n}-"));
        }
        match req.call() {
            Ok(r) => Ok(Ok(r)),
            Err(ureq::Error::Status(code, r)) => Ok(Err((code, r))),
            Err(ureq::Error::Transport(t)) => Err(self.network(url, t)),
        }
    }

    /// Follows redirects (at most 10). With `follow_absolute` false, only relative ones (a renamed
    /// repository) are followed, as `huggingface_hub` does for metadata: a redirect to a full
    /// address (the storage of large files) is returned with its target, since its own headers
    /// describe the file. Relative targets are resolved against the current address.
    fn request(
        &self,
        method: &str,
        url: &str,
        range_from: Option<u64>,
        follow_absolute: bool,
    ) -> Result<(String, ureq::Response)> {
        let mut url = url.to_string();
        for _ in 0..10 {
            let r = match self.send(method, &url, range_from)? {
                Ok(r) => r,
                Err((code, r)) => return Err(self.status_error(code, &r, &url)),
            };
            if !(300..400).contains(&r.status()) || r.status() == 304 {
                return Ok((url, r));
            }
            let Some(loc) = r.header("Location").map(str::to_string) else {
                return Err(self.err(
                    K::Protocol,
                    format!(
                        "{url} answered {} (a redirect) without a Location header",
                        r.status()
                    ),
                ));
            };
            let next = join_url(&url, &loc).ok_or_else(|| {
                self.err(
                    K::Protocol,
                    format!("{url} redirects to `{loc}`, which is not a usable address"),
                )
            })?;
            let absolute =
                loc.starts_with("http://") || loc.starts_with("https://") || loc.starts_with("//");
            if !follow_absolute && absolute {
                return Ok((next, r));
            }
            url = next;
        }
        Err(self.err(
            K::Protocol,
            format!("too many redirects (more than 10) from {url}"),
        ))
    }

    /// The error for a 4xx/5xx answer, from the hub's `X-Error-Code` header where it gives one.
    fn status_error(&self, code: u16, r: &ureq::Response, url: &str) -> Error {
        let hub_code = r.header("X-Error-Code").unwrap_or("").to_string();
        let hub_msg = r
            .header("X-Error-Message")
            .map(|m| format!(" (the hub says: {m})"))
            .unwrap_or_default();
        let ep = &self.opts.endpoint;
        let repo = self.repo;
        let how = format!(
            "request access on {ep}/{repo}, then set HF_TOKEN to a token of the account that has it \
             (or save the token with `hf auth login`)"
        );
        match (hub_code.as_str(), code) {
            ("GatedRepo", _) | ("", 403) => {
                let who = if self.opts.token.is_some() {
                    "your token has no access to it"
                } else {
                    "no token was given"
                };
                self.err(
                    K::Gated,
                    format!("the repository is gated and {who}; {how}{hub_msg}"),
                )
            }
            ("RepoNotFound", _) | ("", 401) => {
                let note = if self.opts.token.is_some() {
                    "no such repository, or it is private and your token cannot see it"
                } else {
                    "no such repository (if it is private or gated, set HF_TOKEN to a token with access)"
                };
                self.err(K::RepoNotFound, format!("{note}; check the id{hub_msg}"))
            }
            ("RevisionNotFound", _) => self.err(
                K::RevisionNotFound,
                format!(
                    "no revision `{}` (branch, tag or commit){hub_msg}",
                    self.opts.revision.as_deref().unwrap_or("main")
                ),
            ),
            ("EntryNotFound", _) => {
                self.err(K::EntryNotFound, format!("{url}: no such file{hub_msg}"))
            }
            (_, 404) => self.err(
                K::RepoNotFound,
                format!(
                    "{url} answered 404 Not Found: no such repository, revision or file{hub_msg}"
                ),
            ),
            (_, 429) => self.err(
                K::Network,
                format!("{url} answered 429 Too Many Requests; wait and run again{hub_msg}"),
            ),
            _ => self.err(K::Protocol, format!("{url} answered HTTP {code}{hub_msg}")),
        }
    }
}

fn origin(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let host_len = rest.find('/').unwrap_or(rest.len());
    Some(&url[..url.len() - rest.len() + host_len])
}

fn same_origin(a: &str, b: &str) -> bool {
    match (origin(a), origin(b)) {
        (Some(x), Some(y)) => x.eq_ignore_ascii_case(y),
        _ => false,
    }
}

/// `loc` (absolute, `/path` or relative) resolved against `base`.
fn join_url(base: &str, loc: &str) -> Option<String> {
    let loc = loc.trim();
    if loc.is_empty() {
        return None;
    }
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return origin(loc)
            .filter(|o| o.len() > "https://".len())
            .map(|_| loc.to_string());
    }
    let o = origin(base)?;
    if let Some(rest) = loc.strip_prefix("//") {
        let scheme = &base[..base.find("://")?];
        return Some(format!("{scheme}://{rest}"));
    }
    if loc.starts_with('/') {
        return Some(format!("{o}{loc}"));
    }
    let path = base[o.len()..].split(['?', '#']).next().unwrap_or("");
    let dir = &path[..path.rfind('/').map(|i| i + 1).unwrap_or(0)];
    let dir = if dir.is_empty() { "/" } else { dir };
    Some(format!("{o}{dir}{loc}"))
}

/// Percent-encodes a path segment (everything but unreserved characters; `/` too when `slash`).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An ETag without quotes and the weak prefix.
fn clean_etag(s: &str) -> String {
    s.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// Whether a name from the hub is a plain relative file path (no `..`, not absolute).
fn safe_name(name: &str) -> bool {
    let p = Path::new(name);
    !name.is_empty()
        && !name.contains('\\')
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Downloads what a model needs from repository `repo` at `opts.revision` (default `main`) into
/// the first cache folder, and returns the snapshot folder (`.../snapshots/<commit>`).
/// Files already in the cache are not fetched again.
pub fn download(repo: &str, opts: &HubOptions) -> Result<PathBuf> {
    let hub_err = |kind, msg: String| Error::Hub {
        repo: repo.to_string(),
        kind,
        msg,
    };
    if !looks_like_id(repo) {
        return Err(hub_err(
            K::RepoNotFound,
            "not a repository id (`owner/name`)".into(),
        ));
    }
    let cache = opts.cache_dirs.first().ok_or_else(|| {
        hub_err(
            K::Cache,
            "no Hugging Face cache folder is known (HF_HUB_CACHE, HF_HOME and HOME are unset)"
                .into(),
        )
    })?;
    let ctx = Ctx::new(repo, opts);
    let revision = opts.revision.as_deref().unwrap_or("main");
    let repo_dir = cache.join(repo_folder(repo));
    let (commit, siblings) = repo_info(&ctx, revision)?;
    let has = |f: &str| siblings.iter().any(|s| s == f);
    if !has("config.json") {
        return Err(ctx.err(
            K::EntryNotFound,
            format!("revision `{revision}` has no config.json; is it a transformers model?"),
        ));
    }
    let weights_kind = if has("model.safetensors") {
        Some("model.safetensors")
    } else if has("model.safetensors.index.json") {
        Some("model.safetensors.index.json")
    } else {
        None
    };
    let Some(weights) = weights_kind else {
        let pickles: Vec<&String> = siblings
            .iter()
            .filter(|s| PICKLE.iter().any(|e| s.ends_with(e)))
            .collect();
        let msg = if pickles.is_empty() {
            format!(
                "revision `{revision}` has no model.safetensors or model.safetensors.index.json"
            )
        } else {
            format!(
                "revision `{revision}` has only pickle weights ({}); nnscope never downloads or loads \
                 pickle files, which can run code. Look for a revision with safetensors weights \
                 (the hub's automatic conversion opens a pull request, loadable with --revision refs/pr/N), \
                 or convert the checkpoint to safetensors yourself",
                pickles.iter().take(3).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )
        };
        return Err(ctx.err(K::NotSafetensors, msg));
    };

    let snap = repo_dir.join("snapshots").join(&commit);
    let mut files: Vec<String> = SMALL_FILES
        .iter()
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    files.push(weights.to_string());
    for f in &files {
        fetch_file(&ctx, &repo_dir, &commit, f)?;
    }
    if weights == "model.safetensors.index.json" {
        let index = snap.join(weights);
        let text = std::fs::read_to_string(&index).map_err(|e| ctx.cache_err(&index, e))?;
        let shards = index_shards(&index, &text).map_err(|e| match e {
            Error::Weights { msg, .. } => ctx.err(
                K::NotSafetensors,
                format!("model.safetensors.index.json: {msg}"),
            ),
            other => other,
        })?;
        for s in &shards {
            if !has(s) {
                return Err(ctx.err(
                    K::EntryNotFound,
                    format!("model.safetensors.index.json names shard `{s}`, which the repository does not have"),
                ));
            }
        }
        for s in &shards {
            fetch_file(&ctx, &repo_dir, &commit, s)?;
        }
    }
    if revision != commit {
        let ref_path = repo_dir.join("refs").join(revision);
        if let Some(parent) = ref_path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ctx.cache_err(parent, e))?;
        }
        std::fs::write(&ref_path, &commit).map_err(|e| ctx.cache_err(&ref_path, e))?;
    }
    Ok(snap)
}

impl<'a> Ctx<'a> {
    fn new(repo: &'a str, opts: &'a HubOptions) -> Self {
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(60))
            .build();
        Ctx { repo, opts, agent }
    }
}

/// The commit a revision names and the files of the repository at it.
fn repo_info(ctx: &Ctx, revision: &str) -> Result<(String, Vec<String>)> {
    let opts = ctx.opts;
    let repo = ctx.repo;
    if !safe_name(revision) {
        return Err(ctx.err(
            K::RevisionNotFound,
            format!("`{revision}` is not a usable revision name"),
        ));
    }

    // Which commit, and which files.
    let info_url = format!(
        "{}/api/models/{repo}/revision/{}",
        opts.endpoint,
        encode(revision, false)
    );
    let (_, r) = ctx.request("GET", &info_url, None, true)?;
    let mut body = String::new();
    r.into_reader()
        .take(64 << 20)
        .read_to_string(&mut body)
        .map_err(|e| ctx.network(&info_url, e))?;
    let info: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| ctx.err(K::Protocol, format!("{info_url} did not answer JSON ({e})")))?;
    let commit = info
        .get("sha")
        .and_then(|s| s.as_str())
        .filter(|s| is_commit(s))
        .ok_or_else(|| {
            ctx.err(
                K::Protocol,
                format!("{info_url}: the answer has no commit hash (`sha`)"),
            )
        })?
        .to_string();
    let siblings: Vec<String> = info
        .get("siblings")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.get("rfilename").and_then(|f| f.as_str()))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Ok((commit, siblings))
}

/// Downloads the files `files` (paths inside the repository) of model repository `repo` at
/// `opts.revision` into the first cache folder, unless a cached snapshot of that revision already
/// has them, and returns the snapshot folder. For repositories that are not transformers models
/// (SAELens releases: `folder/cfg.json`, `folder/sae_weights.safetensors`).
pub fn download_files(repo: &str, files: &[String], opts: &HubOptions) -> Result<PathBuf> {
    let hub_err = |kind, msg: String| Error::Hub {
        repo: repo.to_string(),
        kind,
        msg,
    };
    if !looks_like_id(repo) {
        return Err(hub_err(
            K::RepoNotFound,
            "not a repository id (`owner/name`)".into(),
        ));
    }
    for dir in &opts.cache_dirs {
        let repo_dir = dir.join(repo_folder(repo));
        if let Some(snap) = super::cached_snapshot(&repo_dir, opts.revision.as_deref()) {
            if files.iter().all(|f| snap.join(f).is_file()) {
                return Ok(snap);
            }
        }
    }
    if opts.offline {
        return Err(hub_err(
            K::Network,
            format!(
                "{} not in the local Hugging Face cache, and HF_HUB_OFFLINE is set",
                files.join(", ")
            ),
        ));
    }
    let cache = opts.cache_dirs.first().ok_or_else(|| {
        hub_err(
            K::Cache,
            "no Hugging Face cache folder is known (HF_HUB_CACHE, HF_HOME and HOME are unset)"
                .into(),
        )
    })?;
    let ctx = Ctx::new(repo, opts);
    let revision = opts.revision.as_deref().unwrap_or("main");
    let repo_dir = cache.join(repo_folder(repo));
    let (commit, siblings) = repo_info(&ctx, revision)?;
    for f in files {
        if !siblings.iter().any(|s| s == f) {
            return Err(ctx.err(
                K::EntryNotFound,
                format!("revision `{revision}` has no file `{f}`"),
            ));
        }
    }
    for f in files {
        fetch_file(&ctx, &repo_dir, &commit, f)?;
    }
    if revision != commit {
        let ref_path = repo_dir.join("refs").join(revision);
        if let Some(parent) = ref_path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ctx.cache_err(parent, e))?;
        }
        std::fs::write(&ref_path, &commit).map_err(|e| ctx.cache_err(&ref_path, e))?;
    }
    Ok(repo_dir.join("snapshots").join(commit))
}

/// What `HEAD .../resolve/...` says about a file.
struct FileMeta {
    etag: String,
    size: Option<u64>,
    /// Where to GET it (the redirect target for files in external storage).
    url: String,
}

fn head(ctx: &Ctx, url: &str) -> Result<FileMeta> {
    let (final_url, r) = ctx.request("HEAD", url, None, false)?;
    let etag = r
        .header("X-Linked-Etag")
        .or_else(|| r.header("ETag"))
        .map(clean_etag)
        .filter(|e| !e.is_empty())
        .ok_or_else(|| {
            ctx.err(
                K::Protocol,
                format!("{url}: the answer has no ETag, so the file cannot be checked or cached"),
            )
        })?;
    if !safe_name(&etag) || etag.contains('/') {
        return Err(ctx.err(K::Protocol, format!("{url}: unusable ETag `{etag}`")));
    }
    let size = r
        .header("X-Linked-Size")
        .or_else(|| r.header("Content-Length"))
        .and_then(|s| s.trim().parse().ok());
    Ok(FileMeta {
        etag,
        size,
        url: final_url,
    })
}

/// Makes `snapshots/<commit>/<file>` exist, downloading its blob when it is not in the cache.
fn fetch_file(ctx: &Ctx, repo_dir: &Path, commit: &str, file: &str) -> Result<()> {
    if !safe_name(file) {
        return Err(ctx.err(
            K::Protocol,
            format!("the repository lists `{file}`, which is not a plain file name"),
        ));
    }
    let snap_path = repo_dir.join("snapshots").join(commit).join(file);
    if snap_path.is_file() {
        return Ok(());
    }
    let url = format!(
        "{}/{}/resolve/{commit}/{}",
        ctx.opts.endpoint,
        ctx.repo,
        encode(file, true)
    );
    let meta = head(ctx, &url)?;
    let blobs = repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(|e| ctx.cache_err(&blobs, e))?;
    let blob = blobs.join(&meta.etag);
    if !blob.is_file() {
        // One process downloads a blob at a time (the lock file is huggingface_hub's).
        let locks = repo_dir
            .parent()
            .unwrap_or(repo_dir)
            .join(".locks")
            .join(repo_dir.file_name().unwrap_or_default());
        std::fs::create_dir_all(&locks).map_err(|e| ctx.cache_err(&locks, e))?;
        let lock_path = locks.join(format!("{}.lock", meta.etag));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| ctx.cache_err(&lock_path, e))?;
        lock.lock().map_err(|e| ctx.cache_err(&lock_path, e))?;
        let r = if blob.is_file() {
            Ok(())
        } else {
            fetch_blob(ctx, &meta, file, &blob)
        };
        let _ = lock.unlock();
        r?;
    }
    link(ctx, &blob, &snap_path, file)
}

/// Downloads into `<blob>.incomplete` (resuming what is there), checks it, renames it to `blob`.
fn fetch_blob(ctx: &Ctx, meta: &FileMeta, file: &str, blob: &Path) -> Result<()> {
    let part = PathBuf::from(format!("{}.incomplete", blob.display()));
    let mut have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    if meta.size.is_some_and(|s| have > s) {
        have = 0;
    }
    let mut attempt = 0;
    let (resp, resumed) = loop {
        attempt += 1;
        let range = (have > 0).then_some(have);
        match ctx.request("GET", &meta.url, range, true) {
            Ok((_, r)) if r.status() == 206 && range.is_some() => {
                // The range must start where our partial file ends.
                let start = r
                    .header("Content-Range")
                    .and_then(|c| c.trim().strip_prefix("bytes "))
                    .and_then(|c| c.split('-').next())
                    .and_then(|s| s.trim().parse::<u64>().ok());
                if start == Some(have) {
                    break (r, true);
                }
                have = 0;
            }
            Ok((_, r)) if r.status() == 200 => break (r, false),
            Ok((u, r)) => {
                return Err(ctx.err(
                    K::Protocol,
                    format!("{u} answered HTTP {} to a download", r.status()),
                ))
            }
            // 416: what we have is not a prefix the server recognizes; start over once.
            Err(Error::Hub {
                kind: K::Protocol, ..
            }) if have > 0 && attempt == 1 => have = 0,
            Err(e) => return Err(e),
        }
        if attempt >= 2 {
            return Err(ctx.err(
                K::Protocol,
                format!("{}: the download could not be resumed", meta.url),
            ));
        }
    };
    let mut hasher = sha2::Sha256::new();
    let mut out = if resumed {
        // Hash what is already there, then append.
        let mut f = std::fs::File::open(&part).map_err(|e| ctx.cache_err(&part, e))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = have;
        while left > 0 {
            let n = f
                .read(&mut buf[..(left.min(1 << 20) as usize)])
                .map_err(|e| ctx.cache_err(&part, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&part)
            .map_err(|e| ctx.cache_err(&part, e))?;
        f.set_len(have).map_err(|e| ctx.cache_err(&part, e))?;
        let mut f = f;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(have))
            .map_err(|e| ctx.cache_err(&part, e))?;
        f
    } else {
        have = 0;
        std::fs::File::create(&part).map_err(|e| ctx.cache_err(&part, e))?
    };
    let pb = ctx.opts.progress.then(|| {
        let pb = indicatif::ProgressBar::new(meta.size.unwrap_or(0));
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(file.to_string());
        pb.set_position(have);
        pb
    });
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = have;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = out.flush();
                if let Some(pb) = &pb {
                    pb.abandon();
                }
                return Err(ctx.err(
                    K::Network,
                    format!(
                        "the download of {file} was cut after {total} bytes ({e}); run again to \
                         resume it (kept in {})",
                        part.display()
                    ),
                ));
            }
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| ctx.cache_err(&part, e))?;
        total += n as u64;
        if let Some(pb) = &pb {
            pb.set_position(total);
        }
    }
    out.sync_all().map_err(|e| ctx.cache_err(&part, e))?;
    drop(out);
    if let Some(pb) = &pb {
        pb.finish();
    }
    if let Some(size) = meta.size {
        if total < size {
            return Err(ctx.err(
                K::Network,
                format!(
                    "the download of {file} ended after {total} of {size} bytes; run again to resume it"
                ),
            ));
        }
        if total > size {
            let _ = std::fs::remove_file(&part);
            return Err(ctx.err(
                K::Checksum,
                format!("{file}: received {total} bytes, the hub announced {size}; the file was deleted"),
            ));
        }
    }
    // LFS files are named by their sha256: check it.
    let is_sha256 = meta.etag.len() == 64 && meta.etag.chars().all(|c| c.is_ascii_hexdigit());
    if is_sha256 {
        let got: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if !got.eq_ignore_ascii_case(&meta.etag) {
            let _ = std::fs::remove_file(&part);
            return Err(ctx.err(
                K::Checksum,
                format!(
                    "{file}: checksum mismatch (sha256 {got}, the hub announced {}); the file was deleted, run again to download it anew",
                    meta.etag
                ),
            ));
        }
    }
    std::fs::rename(&part, blob).map_err(|e| ctx.cache_err(blob, e))
}

/// `snapshots/<commit>/<file>` -> `../../blobs/<etag>` (relative, as huggingface_hub links), or a
/// copy where symbolic links cannot be made.
fn link(ctx: &Ctx, blob: &Path, snap_path: &Path, file: &str) -> Result<()> {
    let parent = snap_path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| ctx.cache_err(parent, e))?;
    // A dangling link left behind (its blob deleted) is replaced.
    if std::fs::symlink_metadata(snap_path).is_ok() {
        let _ = std::fs::remove_file(snap_path);
    }
    let depth = Path::new(file).components().count() + 1;
    let mut target = PathBuf::new();
    for _ in 0..depth {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob.file_name().unwrap_or_default());
    #[cfg(unix)]
    {
        if std::os::unix::fs::symlink(&target, snap_path).is_ok() {
            return Ok(());
        }
    }
    let _ = target;
    std::fs::copy(blob, snap_path)
        .map(|_| ())
        .map_err(|e| ctx.cache_err(snap_path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            join_url("http://a:1/x/y?q", "/z").as_deref(),
            Some("http://a:1/z")
        );
        assert_eq!(
            join_url("http://a:1/x/y", "z").as_deref(),
            Some("http://a:1/x/z")
        );
        assert_eq!(
            join_url("https://a/x", "https://b/c").as_deref(),
            Some("https://b/c")
        );
        assert_eq!(
            join_url("https://a/x", "//b/c").as_deref(),
            Some("https://b/c")
        );
        assert_eq!(join_url("https://a/x", "").as_deref(), None);
        assert_eq!(join_url("https://a/x", "https://").as_deref(), None);
        assert!(same_origin("http://a:1/x", "http://A:1"));
        assert!(!same_origin("http://a:1/x", "http://a:2/x"));
        assert_eq!(encode("a b/c.json", true), "a%20b/c.json");
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(clean_etag("W/\"abc\""), "abc");
        assert!(!safe_name("../x") && !safe_name("/x") && safe_name("a/b.json"));
    }
}
