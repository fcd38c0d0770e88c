//! `nnscope::collect`: every document's values in the shards equal the document run alone (1e-5 on
//! probabilities, 1e-4 relative on the rest), for every `Positions`; JSON Lines; resume; refusals;
//! shards merged equal one unsplit run. (The kill test and N processes: the CLI's tests.)

use candle_core::{DType, Device, IndexOp, Tensor, D};
use nnscope::collect::{self, CollectOptions, Corpus, Manifest, Positions, Shard};
use nnscope::{Input, LoadOptions, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(arch)
}

fn load(arch: &str) -> Model {
    Model::load(fixture(arch).to_str().unwrap(), &LoadOptions::default()).unwrap()
}

/// Documents of varied lengths (one empty: skipped, still a record).
fn documents() -> Vec<String> {
    let words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "Free",
        "software",
        "runs",
        "everywhere",
        "42",
        "!",
    ];
    (0..11)
        .map(|i| {
            let n = if i == 4 { 0 } else { 1 + (i * 7) % 23 };
            (0..n)
                .map(|k| words[(i * 5 + k * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn write_text(dir: &Path, docs: &[String]) -> PathBuf {
    let p = dir.join("corpus.txt");
    std::fs::write(&p, docs.join("\n") + "\n").unwrap();
    p
}

/// All parts of a folder, concatenated per tensor name (in manifest order).
fn read_all(dir: &Path) -> (Manifest, HashMap<String, Tensor>) {
    let m = Manifest::read(dir).unwrap();
    let mut parts: HashMap<String, Vec<Tensor>> = HashMap::new();
    for p in &m.parts {
        let t = candle_core::safetensors::load(dir.join(&p.file), &Device::Cpu).unwrap();
        for (k, v) in t {
            // Offsets are per part; rebuild them from the token counts below.
            parts.entry(k).or_default().push(v);
        }
    }
    let cat = parts
        .into_iter()
        .filter(|(k, _)| k != "document_offsets")
        .map(|(k, v)| (k, Tensor::cat(&v, 0).unwrap()))
        .collect();
    (m, cat)
}

fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// 1e-4 relative to the reference's largest magnitude.
fn close(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{name}");
    let d = max_abs(&(got - want).unwrap());
    let scale = max_abs(want).max(1.0);
    assert!(d <= 1e-4 * scale, "{name}: differs by {d} (scale {scale})");
}

fn probs_close(name: &str, got: &Tensor, want: &Tensor) {
    let p = |t: &Tensor| candle_nn::ops::softmax_last_dim(t).unwrap();
    let d = max_abs(&(p(got) - p(want)).unwrap());
    assert!(d <= 1e-5, "{name}: probabilities differ by {d}");
}

fn check_against_alone(arch: &str, positions: Positions, max_tokens: Option<usize>) {
    let model = load(arch);
    let tmp = tempfile::tempdir().unwrap();
    let docs = documents();
    let corpus = Corpus::text(write_text(tmp.path(), &docs));
    let saves = ["layers_output.0", "mlps_output.1", "logits"];
    let mut opts = CollectOptions::new(&model, &saves, positions);
    opts.batch_size = 3;
    opts.shard_documents = 4;
    opts.max_tokens = max_tokens;
    let out = tmp.path().join("acts");
    let s = collect::collect(&model, &corpus, &out, &opts).unwrap();
    let (m, t) = read_all(&out);
    assert!(m.finished);
    assert_eq!(m.parts.len(), 3); // 10 documents with tokens, 4 a shard
    assert_eq!(m.parts[0].documents, 4);
    assert_eq!(s.documents, 10);
    let index: Vec<i64> = t["document_index"].to_vec1().unwrap();
    assert_eq!(index, vec![0, 1, 2, 3, 5, 6, 7, 8, 9, 10]);
    let lens: Vec<i64> = t["document_tokens"].to_vec1().unwrap();
    let mut offset = 0usize;
    for (d, &rec) in index.iter().enumerate() {
        let mut plan = model.trace(Input::prompts(&[&docs[rec as usize]]));
        for n in saves {
            plan = plan.save(n).unwrap();
        }
        let (ids, _) = model.tokenize(&[&docs[rec as usize]]).unwrap();
        let full = ids.dim(1).unwrap();
        let l = max_tokens.map_or(full, |m| full.min(m));
        assert_eq!(lens[d] as usize, l, "{arch}: document {rec} token count");
        // Alone, truncated as collect truncates.
        let alone = model
            .run_plan(plan.plan(), &Input::ids(ids.narrow(1, 0, l).unwrap()))
            .unwrap();
        for n in saves {
            let want = alone.get(n).unwrap().i(0).unwrap(); // [l, ...]
            let want = match positions {
                Positions::All => want,
                Positions::Last => want.i(l - 1).unwrap(),
                Positions::Mean => want.mean(0).unwrap(),
            };
            let got = match positions {
                Positions::All => t[n].narrow(0, offset, l).unwrap(),
                _ => t[n].i(d).unwrap(),
            };
            let what = format!("{arch} {positions} {n} document {rec}");
            close(&what, &got, &want);
            if n == "logits" && positions != Positions::Mean {
                probs_close(&what, &got, &want);
            }
        }
        offset += l;
    }
    assert_eq!(offset, m.tokens);
}

#[test]
fn values_equal_each_document_alone() {
    for arch in ["gpt2", "llama"] {
        for positions in [Positions::All, Positions::Last, Positions::Mean] {
            check_against_alone(arch, positions, None);
        }
        check_against_alone(arch, Positions::All, Some(5));
    }
}

#[test]
fn json_lines_field_and_errors() {
    let model = load("llama");
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("c.jsonl");
    std::fs::write(
        &p,
        "{\"body\": \"first document\", \"id\": 1}\n\n{\"body\": \"second one here\"}\n",
    )
    .unwrap();
    let opts = CollectOptions::new(&model, &["layers_output.1"], Positions::Last);
    let out = tmp.path().join("o");
    let s = collect::collect(&model, &Corpus::json_lines(&p, "body"), &out, &opts).unwrap();
    assert_eq!(s.documents, 2);
    let (m, t) = read_all(&out);
    assert_eq!(m.records, 2);
    assert_eq!(t["layers_output.1"].dims(), &[2, 64]);

    // A missing field names the line and the fields there are; nothing is left behind.
    let out2 = tmp.path().join("o2");
    let e = collect::collect(&model, &Corpus::json_lines(&p, "text"), &out2, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("c.jsonl:1: no field `text` (fields: body, id)"),
        "{e}"
    );
    assert!(!out2.exists());

    // A value that is not [batch, tokens, ...] is refused with its shape.
    let opts = CollectOptions::new(&model, &["attention_probabilities.0"], Positions::Last);
    let e = collect::collect(&model, &Corpus::json_lines(&p, "body"), &out2, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[batch, tokens, ...]"), "{e}");
}

#[test]
fn resume_and_refusals() {
    let model = load("gpt2");
    let tmp = tempfile::tempdir().unwrap();
    let corpus = Corpus::text(write_text(tmp.path(), &documents()));
    let mut opts = CollectOptions::new(&model, &["layers_output.1"], Positions::All);
    opts.shard_documents = 3;
    let out = tmp.path().join("o");
    collect::collect(&model, &corpus, &out, &opts).unwrap();
    let (_, whole) = read_all(&out);

    // Simulate a run stopped after its first part: drop the later parts from the manifest, leave
    // a renamed-but-unlisted part and a temporary file behind.
    let mut m = Manifest::read(&out).unwrap();
    m.parts.truncate(1);
    m.documents = m.parts[0].documents;
    m.tokens = m.parts[0].tokens;
    m.finished = false;
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string(&m).unwrap(),
    )
    .unwrap();
    std::fs::write(out.join(".part-00001.safetensors.tmp"), b"partial").unwrap();
    std::fs::remove_file(out.join("part-00003.safetensors")).unwrap();
    let s = collect::collect(&model, &corpus, &out, &opts).unwrap();
    assert_eq!(s.resumed_parts, 1);
    assert_eq!(s.new_documents, 10 - 3);
    assert!(!out.join(".part-00001.safetensors.tmp").exists());
    let (_, resumed) = read_all(&out);
    for (k, v) in &whole {
        let d = max_abs(
            &(v.to_dtype(DType::F64).unwrap() - resumed[k].to_dtype(DType::F64).unwrap()).unwrap(),
        );
        assert_eq!(d, 0.0, "{k}");
    }

    // A finished folder: nothing to do.
    let s = collect::collect(&model, &corpus, &out, &opts).unwrap();
    assert_eq!(s.new_documents, 0);

    // Different saves, positions or model: refused, folder untouched.
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    let mut other = opts.clone();
    other.saves = vec!["layers_output.0".into()];
    let e = collect::collect(&model, &corpus, &out, &other)
        .unwrap_err()
        .to_string();
    assert!(e.contains("different saves"), "{e}");
    let mut other = opts.clone();
    other.positions = Positions::Mean;
    let e = collect::collect(&model, &corpus, &out, &other)
        .unwrap_err()
        .to_string();
    assert!(e.contains("different positions"), "{e}");
    let llama = load("llama");
    let mut other = CollectOptions::new(&llama, &["layers_output.1"], Positions::All);
    other.shard_documents = 3;
    let e = collect::collect(&llama, &corpus, &out, &other)
        .unwrap_err()
        .to_string();
    assert!(e.contains("different model"), "{e}");
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);

    // Never into the model's folder.
    let e = collect::collect(&model, &corpus, &fixture("gpt2").join("acts"), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model's folder"), "{e}");
    assert!(!fixture("gpt2").join("acts").exists());
}

#[test]
fn shards_merge_to_the_unsplit_run() {
    let model = load("llama");
    let tmp = tempfile::tempdir().unwrap();
    let corpus = Corpus::text(write_text(tmp.path(), &documents()));
    let mut opts = CollectOptions::new(&model, &["layers_output.0", "logits"], Positions::Mean);
    opts.shard_documents = 2;
    opts.batch_size = 2;
    let whole = tmp.path().join("whole");
    collect::collect(&model, &corpus, &whole, &opts).unwrap();
    let mut dirs = vec![];
    for i in [2, 0, 1] {
        let mut o = opts.clone();
        o.shard = Some(Shard { index: i, count: 3 });
        let d = tmp.path().join(format!("s{i}"));
        collect::collect(&model, &corpus, &d, &o).unwrap();
        dirs.push(d);
    }
    // Incomplete sets are refused.
    let e = collect::merge(&dirs[..2], &tmp.path().join("m"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("shard 1/3 is missing"), "{e}");
    let s = collect::merge(&dirs, &tmp.path().join("merged")).unwrap();
    assert_eq!(s.documents, 10);
    let (m, merged) = read_all(&tmp.path().join("merged"));
    assert!(m.finished && m.shard.is_none());
    let (_, one) = read_all(&whole);
    for (k, v) in &one {
        if v.dtype() == DType::I64 {
            assert_eq!(
                v.to_vec1::<i64>().unwrap(),
                merged[k].to_vec1::<i64>().unwrap(),
                "{k}"
            );
        } else {
            close(k, &merged[k], v);
        }
    }
    // Merged shards of a mean: per-document values along dim 0.
    assert_eq!(merged["logits"].dims()[0], 10);
    let _ = merged["logits"].argmax(D::Minus1).unwrap();
}

// ---- Sparse autoencoders: feature activations against the SAE goldens from transformers + torch
// (`tests/fixtures/llama/saes/res_post_0/golden.safetensors`, on the model golden's prompt).

/// The model golden's prompt, and the SAE golden's tensors.
fn sae_golden(name: &str) -> (String, HashMap<String, Tensor>) {
    let bytes = std::fs::read(fixture("llama").join("golden.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let prompt = meta.metadata().clone().unwrap()["prompt"].clone();
    let g = candle_core::safetensors::load(
        fixture("llama")
            .join("saes")
            .join(name)
            .join("golden.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    (prompt, g)
}

fn sae_attach(name: &str) -> nnscope::Attach {
    nnscope::Attach::parse(fixture("llama").join("saes").join(name).to_str().unwrap()).unwrap()
}

const FA: &str = "blocks.0.hook_resid_post.sae.feature_acts";

/// The prompt (document 0), a short document and a longer one that starts with the prompt, in one
/// batch: document 0 is left-padded, and every prompt token's row must equal the golden.
fn sae_corpus(dir: &Path, prompt: &str) -> Corpus {
    Corpus::text(write_text(
        dir,
        &[
            prompt.to_string(),
            "Free software".to_string(),
            format!("{prompt} You may copy and distribute verbatim copies of this license."),
        ],
    ))
}

/// The `k` largest values of each row of `want` [rows, d] equal `vals` [rows, k] (largest first),
/// and `want` at each index in `idx` equals the value stored beside it (ties make the indices of
/// equal values interchangeable, so each index is checked through its value).
fn top_k_matches(what: &str, vals: &Tensor, idx: &Tensor, want: &Tensor, k: usize) {
    let want: Vec<Vec<f32>> = want.to_vec2().unwrap();
    let vals: Vec<Vec<f32>> = vals.to_vec2().unwrap();
    let idx: Vec<Vec<i64>> = idx.to_vec2().unwrap();
    assert_eq!(vals.len(), want.len(), "{what}: rows");
    let scale = want.iter().flatten().fold(1f32, |m, x| m.max(x.abs()));
    for (r, w) in want.iter().enumerate() {
        let mut sorted = w.clone();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
        assert_eq!(vals[r].len(), k, "{what}: k");
        for j in 0..k {
            assert!(
                (vals[r][j] - sorted[j]).abs() <= 1e-4 * scale,
                "{what}: row {r}, top {j}: {} vs golden {}",
                vals[r][j],
                sorted[j]
            );
            let i = idx[r][j] as usize;
            assert!(
                (w[i] - vals[r][j]).abs() <= 1e-4 * scale,
                "{what}: row {r}: feature {i} is {} in the golden, stored {}",
                w[i],
                vals[r][j]
            );
        }
        let mut seen = idx[r].clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), k, "{what}: row {r}: repeated indices");
    }
}

#[test]
fn sae_feature_acts_match_the_golden() {
    let model = load("llama");
    let (prompt, g) = sae_golden("res_post_0");
    let golden = g["feature_acts"].get(0).unwrap(); // [T, d_sae]
    let t = golden.dim(0).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = sae_corpus(tmp.path(), &prompt);
    for positions in [Positions::All, Positions::Last, Positions::Mean] {
        let want = match positions {
            Positions::All => golden.clone(),
            Positions::Last => golden.narrow(0, t - 1, 1).unwrap(),
            Positions::Mean => golden.mean_keepdim(0).unwrap(),
        };
        // Whole feature activations.
        let mut opts = CollectOptions::new(&model, &[FA, "layers_output.0"], positions);
        opts.saes = vec![sae_attach("res_post_0")];
        opts.batch_size = 3;
        let out = tmp.path().join(format!("full-{positions}"));
        collect::collect(&model, &corpus, &out, &opts).unwrap();
        let (m, v) = read_all(&out);
        let tokens: Vec<i64> = v["document_tokens"].to_vec1().unwrap();
        assert_eq!(
            tokens[0] as usize, t,
            "the prompt tokenizes as the golden's input"
        );
        let rows = want.dim(0).unwrap();
        close(
            &format!("{FA} ({positions})"),
            &v[FA].narrow(0, 0, rows).unwrap(),
            &want,
        );
        // The SAE is recorded.
        assert_eq!(m.saes.len(), 1);
        assert_eq!(m.saes[0].hook, "blocks.0.hook_resid_post");
        assert!(m.saes[0].spec.ends_with("res_post_0"), "{}", m.saes[0].spec);
        assert!(!m.saes[0].splice);
        assert_eq!(m.saes[0].weights_sha256.len(), 64);
        assert_eq!(m.top_k, None);

        // Top-k: two tensors per save, the top 8 of the golden's rows (of its mean for `mean`).
        let k = 8;
        let mut opts = opts.clone();
        opts.top_k = Some(k);
        let out = tmp.path().join(format!("topk-{positions}"));
        collect::collect(&model, &corpus, &out, &opts).unwrap();
        let (m, v) = read_all(&out);
        assert_eq!(m.top_k, Some(k));
        let (vn, inn) = collect::top_k_names(FA);
        assert!(!v.contains_key(FA), "a top-k save is not stored whole");
        assert!(
            v.contains_key("layers_output.0"),
            "other saves are stored whole"
        );
        assert_eq!(v[&vn].dtype(), DType::F32);
        assert_eq!(v[&inn].dtype(), DType::I64);
        assert_eq!(v[&vn].dims(), v[&inn].dims());
        assert_eq!(v[&vn].dim(1).unwrap(), k);
        top_k_matches(
            &format!("top-{k} ({positions})"),
            &v[&vn].narrow(0, 0, rows).unwrap(),
            &v[&inn].narrow(0, 0, rows).unwrap(),
            &want,
            k,
        );
    }
}

#[test]
fn sae_splice_and_clamp_match_the_golden() {
    let model = load("llama");
    let (prompt, g) = sae_golden("res_post_0");
    let t = g["logits"].dim(1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = sae_corpus(tmp.path(), &prompt);
    // Spliced.
    let mut opts = CollectOptions::new(&model, &["logits"], Positions::All);
    opts.saes = vec![sae_attach("res_post_0").splice(true)];
    let out = tmp.path().join("spliced");
    collect::collect(&model, &corpus, &out, &opts).unwrap();
    let (m, v) = read_all(&out);
    assert!(m.saes[0].splice);
    close(
        "spliced logits",
        &v["logits"].narrow(0, 0, t).unwrap(),
        &g["spliced_logits"].get(0).unwrap(),
    );
    // One feature clamped, the error term kept.
    let c: Vec<f32> = g["clamp"].to_vec1().unwrap();
    let clamp: nnscope::Clamp = format!("{FA}:{}={}", c[0] as usize, c[1]).parse().unwrap();
    let mut opts = CollectOptions::new(&model, &["logits"], Positions::All);
    opts.saes = vec![sae_attach("res_post_0")];
    opts.clamps = vec![clamp.clone()];
    let out = tmp.path().join("clamped");
    collect::collect(&model, &corpus, &out, &opts).unwrap();
    let (m, v) = read_all(&out);
    assert_eq!(m.clamps, vec![clamp.to_string()]);
    close(
        "clamped logits",
        &v["logits"].narrow(0, 0, t).unwrap(),
        &g["clamped_logits"].get(0).unwrap(),
    );
}

#[test]
fn sae_resume_refuses_changed_saes() {
    let model = load("llama");
    let (prompt, _) = sae_golden("res_post_0");
    let tmp = tempfile::tempdir().unwrap();
    let corpus = sae_corpus(tmp.path(), &prompt);
    let mut opts = CollectOptions::new(&model, &[FA], Positions::Last);
    opts.saes = vec![sae_attach("res_post_0")];
    let out = tmp.path().join("acts");
    collect::collect(&model, &corpus, &out, &opts).unwrap();
    // The same job: resumes (finished, nothing to do).
    let s = collect::collect(&model, &corpus, &out, &opts).unwrap();
    assert_eq!(s.new_documents, 0);
    let refused = |o: &CollectOptions, what: &str| {
        let e = collect::collect(&model, &corpus, &out, o)
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{e}");
    };
    // Another SAE set: one more SAE, spliced, at another hook, none at all (the save then fails
    // to resolve, before the manifest is compared: also a refusal).
    let mut more = opts.clone();
    more.saes.push(sae_attach("topk_post_1"));
    refused(&more, "different SAEs");
    let mut spliced = opts.clone();
    spliced.saes = vec![sae_attach("res_post_0").splice(true)];
    refused(&spliced, "different SAEs");
    let mut other_hook = CollectOptions::new(
        &model,
        &["layers_output.0.sae.feature_acts"],
        Positions::Last,
    );
    other_hook.saes = vec![sae_attach("res_post_0").at("layers_output.0")];
    refused(&other_hook, "different");
    let mut none = opts.clone();
    none.saes.clear();
    refused(&none, "no SAE is attached");
    // Top-k and clamps are part of the job too.
    let mut topk = opts.clone();
    topk.top_k = Some(4);
    refused(&topk, "different top-k");
    let mut clamped = opts.clone();
    clamped.clamps = vec![format!("{FA}:3=1.5").parse().unwrap()];
    refused(&clamped, "different clamps");
    // Top-k without an SAE save, and a k past the features, are refused with clear errors.
    let mut bad = CollectOptions::new(&model, &["layers_output.0"], Positions::All);
    bad.top_k = Some(4);
    let e = collect::collect(&model, &corpus, &tmp.path().join("bad"), &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no save is an SAE"), "{e}");
    let mut big = opts.clone();
    big.top_k = Some(1000);
    let e = collect::collect(&model, &corpus, &tmp.path().join("big"), &big)
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than the 256 features"), "{e}");
}
