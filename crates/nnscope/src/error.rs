//! The library's error type: every variant names the file, key, tensor, hookpoint or shape at fault.

use std::path::PathBuf;

/// Errors of nnscope.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A model could not be found.
    #[error("model `{model}` not found: {msg}")]
    ModelNotFound {
        /// What the user gave.
        model: String,
        /// Where we looked.
        msg: String,
    },
    /// config.json is unusable.
    #[error("config {path}: {msg}")]
    Config {
        /// config.json.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Weights are unusable.
    #[error("weights {path}: {msg}")]
    Weights {
        /// The safetensors file (or index).
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The tokenizer is missing or unusable.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer {
        /// tokenizer.json.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// An output path cannot be written (it would overwrite a file the model was loaded from).
    #[error("output {path}: {msg}")]
    Output {
        /// The output path as given.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Model inputs are unusable.
    #[error("input: {0}")]
    Input(String),
    /// A hookpoint path does not resolve or cannot be used that way.
    #[error("hookpoint `{path}`: {msg}{}", crate::error::suggest(.suggestions))]
    Hookpoint {
        /// The path as given.
        path: String,
        /// What is wrong.
        msg: String,
        /// Nearest valid names.
        suggestions: Vec<String>,
    },
    /// An edit or replacement has the wrong shape.
    #[error("hookpoint `{path}`: new value has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The hookpoint.
        path: String,
        /// Shape of the original value.
        expected: Vec<usize>,
        /// Shape given.
        got: Vec<usize>,
    },
    /// An edit or replacement has the wrong dtype.
    #[error("hookpoint `{path}`: new value has dtype {got}, expected {expected}")]
    DTypeMismatch {
        /// The hookpoint.
        path: String,
        /// The original dtype.
        expected: String,
        /// The dtype given.
        got: String,
    },
    /// An edit produced NaN or infinity (only checked when asked for).
    #[error("hookpoint `{path}`: the edit produced NaN or infinity")]
    NonFinite {
        /// The hookpoint.
        path: String,
    },
    /// The requested saves would not fit in memory (estimated before running).
    #[error(
        "the requested saves need about {} ({detail}), more than the {} of memory {source_of_limit}; \
         save fewer hookpoints, or use fewer or shorter prompts",
        human_bytes(*.needed),
        human_bytes(*.available)
    )]
    TooLarge {
        /// Estimated bytes of all saved values.
        needed: u64,
        /// Bytes available (or the limit set with `Trace::memory_limit`).
        available: u64,
        /// Where `available` comes from.
        source_of_limit: String,
        /// The largest saves and their estimated shapes.
        detail: String,
    },
    /// An edit function failed.
    #[error("hookpoint `{path}`: the edit failed: {msg}")]
    Edit {
        /// The hookpoint.
        path: String,
        /// The edit's error.
        msg: String,
    },
    /// A download from the Hugging Face Hub failed.
    #[error("`{repo}` on the Hugging Face Hub: {msg}")]
    Hub {
        /// The repository id (`owner/name`).
        repo: String,
        /// What kind of failure, for programs that react to it.
        kind: HubErrorKind,
        /// What is wrong and what to do.
        msg: String,
    },
    /// A tensor operation failed.
    #[error("{}", crate::error::candle_message(.0))]
    Tensor(candle_core::Error),
}

/// What went wrong talking to the Hugging Face Hub (see [`Error::Hub`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubErrorKind {
    /// No such repository (or it is private and the token cannot see it).
    RepoNotFound,
    /// No such revision (branch, tag or commit) in the repository.
    RevisionNotFound,
    /// A file the repository lists could not be found.
    EntryNotFound,
    /// The repository is gated or private and the request had no token, or a token without access.
    Gated,
    /// The hub could not be reached (no network, refused connection, timeout, cut transfer).
    Network,
    /// The repository has no safetensors weights (only pickle files, or nothing).
    NotSafetensors,
    /// A downloaded file does not match the checksum (or size) the hub announced; it was deleted.
    Checksum,
    /// Any other unexpected answer (server error, malformed reply, redirect without a target).
    Protocol,
    /// Writing to the cache failed.
    Cache,
}

/// candle attaches a backtrace to its errors when `RUST_BACKTRACE` is set; nnscope's errors stay
/// one readable line, so the backtrace is dropped (the message and any context are kept).
pub fn strip_backtrace(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => strip_backtrace(*inner),
        E::Context { inner, context } => E::Context {
            inner: Box::new(strip_backtrace(*inner)),
            context,
        },
        E::WithPath { inner, path } => E::WithPath {
            inner: Box::new(strip_backtrace(*inner)),
            path,
        },
        other => other,
    }
}

/// A candle error as one line: without the backtrace candle attaches when `RUST_BACKTRACE` is set
/// (however the error was wrapped), context before the message.
pub(crate) fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other.to_string().replace('\n', " "),
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Tensor(strip_backtrace(e))
    }
}

/// `1.5 GiB`, `12.0 MiB`, `300 B`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

pub(crate) fn suggest(s: &[String]) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(
            "; did you mean {}?",
            s.iter()
                .map(|x| format!("`{x}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Result with nnscope's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Names from `candidates` closest to `name` (edit distance), best first, at most `n`.
pub fn nearest<'a, I: IntoIterator<Item = &'a str>>(
    name: &str,
    candidates: I,
    n: usize,
) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> = candidates
        .into_iter()
        .map(|c| (strsim_distance(name, c), c))
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    let limit = (name.len() / 2).max(3);
    scored
        .into_iter()
        .filter(|(d, _)| *d <= limit)
        .take(n)
        .map(|(_, c)| c.to_string())
        .collect()
}

/// Levenshtein distance.
fn strsim_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}
