//! Downloads from the Hugging Face Hub, against a stand-in hub on 127.0.0.1 (tests/hub_server):
//! the cache layout huggingface_hub writes, shards, revisions, tokens for gated repositories,
//! resuming a cut download, and a clear error for every failure. No test touches the internet.

mod common;
mod hub_server;

use hub_server::{dead_endpoint, sha256_hex, Repo, Server};
use nnscope::hub::{self, HubOptions};
use nnscope::{Error, HubErrorKind, LoadOptions, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const COMMIT: &str = "1111111111111111111111111111111111111111";
const COMMIT_V1: &str = "2222222222222222222222222222222222222222";

fn fixture_file(f: &str) -> Vec<u8> {
    std::fs::read(common::fixture("llama").join(f)).unwrap()
}

/// The llama fixture as a hub repository, with files a model does not need (a pickle copy, a
/// README) that must not be downloaded.
fn tiny() -> Repo {
    let mut files: Vec<(String, Vec<u8>)> = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .iter()
    .map(|f| (f.to_string(), fixture_file(f)))
    .collect();
    files.push(("pytorch_model.bin".into(), b"pickle bytes".to_vec()));
    files.push(("README.md".into(), b"# tiny".to_vec()));
    Repo {
        files,
        revisions: [
            ("main".to_string(), COMMIT.to_string()),
            (COMMIT.to_string(), COMMIT.to_string()),
            ("v1".to_string(), COMMIT_V1.to_string()),
            (COMMIT_V1.to_string(), COMMIT_V1.to_string()),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

/// The fixture's weights split into two shards with an index, as transformers saves them.
fn sharded() -> Repo {
    let bytes = fixture_file("model.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    let half = names.len() / 2;
    let mut files = vec![];
    let mut map = serde_json::Map::new();
    for (i, part) in [&names[..half], &names[half..]].iter().enumerate() {
        let fname = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        files.push((fname.clone(), safetensors::serialize(views, None).unwrap()));
        for n in part.iter() {
            map.insert(n.clone(), serde_json::Value::String(fname.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    let mut r = tiny();
    r.files.retain(|(f, _)| f != "model.safetensors");
    r.files.push((
        "model.safetensors.index.json".into(),
        index.to_string().into_bytes(),
    ));
    r.files.extend(files);
    r
}

fn server() -> Server {
    let mut repos = HashMap::new();
    repos.insert("org/tiny".to_string(), tiny());
    repos.insert("org/sharded".to_string(), sharded());
    let mut gated = tiny();
    gated.gated_token = Some("hf_good".into());
    repos.insert("org/gated".to_string(), gated);
    let mut pickle = tiny();
    pickle.files.retain(|(f, _)| f != "model.safetensors");
    repos.insert("org/pickle".to_string(), pickle);
    let mut bin_index = sharded();
    for (f, d) in bin_index.files.iter_mut() {
        if f == "model.safetensors.index.json" {
            *d = br#"{"weight_map": {"model.embed_tokens.weight": "pytorch_model-00001-of-00002.bin"}}"#
                .to_vec();
        }
    }
    repos.insert("org/bin-index".to_string(), bin_index);
    let mut corrupt = tiny();
    corrupt.corrupt = true;
    repos.insert("org/corrupt".to_string(), corrupt);
    repos.insert("org/resume".to_string(), tiny());
    Server::start(repos)
}

fn opts(endpoint: &str, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: endpoint.to_string(),
        cache_dirs: vec![cache.to_path_buf()],
        token: None,
        offline: false,
        revision: None,
        progress: false,
    }
}

fn hub_err(r: nnscope::Result<PathBuf>) -> (HubErrorKind, String) {
    match r {
        Err(e @ Error::Hub { kind, .. }) => (kind, e.to_string()),
        other => panic!("expected a hub error, got {other:?}"),
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} should contain {p:?}");
    }
}

#[test]
fn downloads_into_the_huggingface_hub_cache_layout() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path();
    let snap = hub::resolve_with("org/tiny", &opts(&srv.url, cache)).unwrap();
    let repo = cache.join("models--org--tiny");
    assert_eq!(snap, repo.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    // Large files: a blob named by its sha256, linked from the snapshot as huggingface_hub links.
    let weights = fixture_file("model.safetensors");
    let sha = sha256_hex(&weights);
    assert_eq!(
        std::fs::read(repo.join("blobs").join(&sha)).unwrap(),
        weights
    );
    assert_eq!(
        std::fs::read_link(snap.join("model.safetensors")).unwrap(),
        PathBuf::from("../../blobs").join(&sha)
    );
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(snap.join(f)).unwrap(), fixture_file(f), "{f}");
        assert!(std::fs::symlink_metadata(snap.join(f))
            .unwrap()
            .file_type()
            .is_symlink());
    }
    // Only what a model needs: never the pickle file, nor the README.
    assert!(!snap.join("pytorch_model.bin").exists());
    assert!(!snap.join("README.md").exists());
    assert!(srv
        .log()
        .iter()
        .all(|l| !l.path.ends_with(".bin") && !l.path.ends_with("README.md")));
    // No partial or lock leftovers in blobs/.
    for e in std::fs::read_dir(repo.join("blobs")).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        assert!(!n.ends_with(".incomplete"), "{n}");
    }
    // The downloaded model computes what transformers computed.
    let m = Model::load(snap.to_str().unwrap(), &LoadOptions::default()).unwrap();
    common::check_input(&m, &common::golden("llama"), "single");

    // Once complete in the cache, the hub is not asked again (here: it is unreachable).
    let again = hub::resolve_with("org/tiny", &opts(&dead_endpoint(), cache)).unwrap();
    assert_eq!(again, snap);
    // Offline, the cache answers; an id that is not there is an error naming HF_HUB_OFFLINE.
    let mut off = opts(&dead_endpoint(), cache);
    off.offline = true;
    assert_eq!(hub::resolve_with("org/tiny", &off).unwrap(), snap);
    let e = hub::resolve_with("org/sharded", &off).unwrap_err();
    assert!(matches!(e, Error::ModelNotFound { .. }), "{e:?}");
    assert_has(&e.to_string(), &["models--org--sharded", "HF_HUB_OFFLINE"]);
}

#[test]
fn sharded_checkpoint_via_the_index() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let snap = hub::download("org/sharded", &opts(&srv.url, tmp.path())).unwrap();
    for f in [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        assert!(snap.join(f).is_file(), "{f}");
    }
    let m = Model::load(snap.to_str().unwrap(), &LoadOptions::default()).unwrap();
    common::check_input(&m, &common::golden("llama"), "single");
}

#[test]
fn revision_and_its_ref() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(&srv.url, tmp.path());
    o.revision = Some("v1".into());
    let snap = hub::resolve_with("org/tiny", &o).unwrap();
    let repo = tmp.path().join("models--org--tiny");
    assert_eq!(snap, repo.join("snapshots").join(COMMIT_V1));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/v1")).unwrap(),
        COMMIT_V1
    );
    assert!(!repo.join("refs/main").exists());
    // Files are asked for at the commit, so that all of them come from the same one.
    assert!(srv
        .log()
        .iter()
        .any(|l| l.path == format!("/org/tiny/resolve/{COMMIT_V1}/config.json")));
    // A commit hash as revision: no ref file is written for it.
    o.revision = Some(COMMIT.into());
    let snap = hub::resolve_with("org/tiny", &o).unwrap();
    assert_eq!(snap, repo.join("snapshots").join(COMMIT));
    o.revision = Some("nope".into());
    let (kind, msg) = hub_err(hub::resolve_with("org/tiny", &o));
    assert_eq!(kind, HubErrorKind::RevisionNotFound);
    assert_has(&msg, &["org/tiny", "no revision `nope`"]);
}

#[test]
fn gated_repository_needs_a_token_with_access() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(&srv.url, tmp.path());
    let (kind, msg) = hub_err(hub::download("org/gated", &o));
    assert_eq!(kind, HubErrorKind::Gated);
    assert_has(
        &msg,
        &[
            "gated",
            "no token was given",
            "request access on",
            "/org/gated",
            "HF_TOKEN",
        ],
    );
    o.token = Some("hf_wrong".into());
    let (kind, msg) = hub_err(hub::download("org/gated", &o));
    assert_eq!(kind, HubErrorKind::Gated);
    assert_has(&msg, &["your token has no access to it", "request access"]);
    o.token = Some("hf_good".into());
    let snap = hub::download("org/gated", &o).unwrap();
    assert!(snap.join("model.safetensors").is_file());
    // The token went to the hub, never to the storage host the weights were redirected to.
    let log = srv.log();
    assert!(log
        .iter()
        .any(|l| l.path.contains("/resolve/") && l.auth.as_deref() == Some("Bearer hf_good")));
    let cdn: Vec<_> = log.iter().filter(|l| l.path.starts_with("/cdn/")).collect();
    assert!(!cdn.is_empty());
    assert!(cdn.iter().all(|l| l.auth.is_none()), "{cdn:?}");
}

#[test]
fn no_such_repository() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let (kind, msg) = hub_err(hub::resolve_with("org/absent", &opts(&srv.url, tmp.path())));
    assert_eq!(kind, HubErrorKind::RepoNotFound);
    assert_has(
        &msg,
        &["`org/absent` on the Hugging Face Hub", "no such repository"],
    );
}

#[test]
fn pickle_only_repository_is_refused_and_nothing_is_downloaded() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let (kind, msg) = hub_err(hub::download("org/pickle", &opts(&srv.url, tmp.path())));
    assert_eq!(kind, HubErrorKind::NotSafetensors);
    assert_has(
        &msg,
        &[
            "only pickle weights",
            "pytorch_model.bin",
            "never downloads",
        ],
    );
    assert!(srv.log().iter().all(|l| !l.path.contains("/resolve/")));
    // An index naming pickle shards is refused before any shard is fetched.
    let (kind, msg) = hub_err(hub::download("org/bin-index", &opts(&srv.url, tmp.path())));
    assert_eq!(kind, HubErrorKind::NotSafetensors);
    assert_has(
        &msg,
        &[
            "pytorch_model-00001-of-00002.bin",
            "not a .safetensors file",
        ],
    );
    assert!(srv.log().iter().all(|l| !l.path.ends_with(".bin")));
}

#[test]
fn checksum_mismatch_is_an_error_and_the_file_is_not_kept() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let (kind, msg) = hub_err(hub::download("org/corrupt", &opts(&srv.url, tmp.path())));
    assert_eq!(kind, HubErrorKind::Checksum);
    assert_has(&msg, &["model.safetensors", "checksum mismatch", "deleted"]);
    let repo = tmp.path().join("models--org--corrupt");
    let blobs: Vec<String> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let sha = sha256_hex(&fixture_file("model.safetensors"));
    assert!(
        blobs.iter().all(|b| !b.starts_with(&sha)),
        "bad blob kept: {blobs:?}"
    );
    assert!(!repo
        .join("snapshots")
        .join(COMMIT)
        .join("model.safetensors")
        .exists());
}

#[test]
fn no_network() {
    let tmp = tempfile::tempdir().unwrap();
    let (kind, msg) = hub_err(hub::resolve_with(
        "org/tiny",
        &opts(&dead_endpoint(), tmp.path()),
    ));
    assert_eq!(kind, HubErrorKind::Network);
    assert_has(
        &msg,
        &["cannot reach http://127.0.0.1:", "HF_HUB_OFFLINE=1"],
    );
}

#[test]
fn cut_download_resumes_with_a_range_request() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let weights = fixture_file("model.safetensors");
    let sha = sha256_hex(&weights);
    srv.state.lock().unwrap().cut_next.insert(sha.clone());
    let o = opts(&srv.url, tmp.path());
    let (kind, msg) = hub_err(hub::download("org/resume", &o));
    assert_eq!(kind, HubErrorKind::Network);
    assert_has(&msg, &["model.safetensors", "run again to resume"]);
    let part = tmp
        .path()
        .join("models--org--resume/blobs")
        .join(format!("{sha}.incomplete"));
    let kept = std::fs::metadata(&part).unwrap().len();
    assert_eq!(kept, weights.len() as u64 / 2);
    let snap = hub::download("org/resume", &o).unwrap();
    assert_eq!(
        std::fs::read(snap.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(!part.exists());
    let ranges: Vec<_> = srv.log().into_iter().filter_map(|l| l.range).collect();
    assert_eq!(ranges, vec![format!("bytes={kept}-")]);
}

#[test]
fn redirects_relative_missing_target_and_loops() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(&srv.url, tmp.path());
    // A renamed repository answers with a relative redirect to its new name.
    let snap = hub::download("org/moved", &o).unwrap();
    assert!(snap.join("model.safetensors").is_file());
    let (kind, msg) = hub_err(hub::download("org/noloc", &o));
    assert_eq!(kind, HubErrorKind::Protocol);
    assert_has(&msg, &["without a Location header"]);
    let (kind, msg) = hub_err(hub::download("org/loop", &o));
    assert_eq!(kind, HubErrorKind::Protocol);
    assert_has(&msg, &["too many redirects"]);
}
