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
