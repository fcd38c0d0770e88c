//! An SAE from a hub repository with a subfolder (`org/repo:folder`), as SAELens releases are laid
//! out, downloaded from the stand-in hub on 127.0.0.1 (tests/hub_server) into the cache layout.

mod common;
mod hub_server;

use hub_server::{Repo, Server};
use nnscope::hub::HubOptions;
use nnscope::{Input, Sae};
use std::collections::HashMap;

const COMMIT: &str = "3333333333333333333333333333333333333333";

#[test]
fn sae_from_a_hub_subfolder() {
    let src = common::fixture("llama").join("saes/res_post_0");
    let read = |f: &str| std::fs::read(src.join(f)).unwrap();
    let repo = Repo {
        files: vec![
            ("blocks.0.hook_resid_post/cfg.json".into(), read("cfg.json")),
            (
                "blocks.0.hook_resid_post/sae_weights.safetensors".into(),
                read("sae_weights.safetensors"),
            ),
            ("README.md".into(), b"# saes".to_vec()),
        ],
        revisions: [
            ("main".to_string(), COMMIT.to_string()),
            (COMMIT.to_string(), COMMIT.to_string()),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let server = Server::start(HashMap::from([("org/saes".to_string(), repo)]));
    let cache = tempfile::tempdir().unwrap();
    let opts = HubOptions {
        endpoint: server.url.clone(),
        cache_dirs: vec![cache.path().to_path_buf()],
        token: None,
        offline: false,
        revision: None,
        progress: false,
    };
    let sae = Sae::load_with("org/saes:blocks.0.hook_resid_post", &opts).unwrap();
    assert_eq!(sae.d_sae, 256);
    let snap = cache
        .path()
        .join("models--org--saes/snapshots")
        .join(COMMIT)
        .join("blocks.0.hook_resid_post");
    assert!(snap.join("sae_weights.safetensors").is_file());
    assert!(!cache
        .path()
        .join("models--org--saes/snapshots")
        .join(COMMIT)
        .join("README.md")
        .exists());
    // Offline, from the cache.
    let offline = HubOptions {
        offline: true,
        ..opts.clone()
    };
    let again = Sae::load_with("org/saes:blocks.0.hook_resid_post", &offline).unwrap();
    let model = common::load("llama");
    let out = model
        .trace(Input::prompts(&["The quick brown fox"]))
        .sae(again)
        .unwrap()
        .save("blocks.0.hook_resid_post.sae.feature_acts")
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(
        out.get("blocks.0.hook_resid_post.sae.feature_acts")
            .unwrap()
            .dims()[2],
        256
    );
    // A folder the repository does not have.
    let e = Sae::load_with("org/saes:blocks.9.hook_resid_post", &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no file `blocks.9.hook_resid_post/cfg.json`"),
        "{e}"
    );
}
