//! Generation with the key/value cache: greedy or sampled, batched with left padding, stopping at
//! end-of-sequence ids, with trace requests served at every step or at chosen steps.
//!
//! Steps are numbered as nnsight's `tracer.iter`: step 0 is the forward over the prompt, step S >= 1
//! the forward over the S-th new token. N new tokens take N forwards.

use crate::nn::KvCache;
use crate::{Error, Model, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// New tokens to generate (at least 1).
    pub max_new_tokens: usize,
    /// Sampling temperature (`None`: greedy unless `top_k`/`top_p` is set, then 1).
    pub temperature: Option<f64>,
    /// Keep only the `k` most likely tokens before sampling.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` (in (0, 1]).
    pub top_p: Option<f64>,
    /// Seed of the sampler (same seed, same tokens). Default 0.
    pub seed: Option<u64>,
    /// Generate `max_new_tokens` even after an end-of-sequence token.
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 16,
            temperature: None,
            top_k: None,
            top_p: None,
            seed: None,
            ignore_eos: false,
        }
    }
}

impl GenerateOptions {
    /// Greedy decoding of `n` new tokens.
    pub fn greedy(n: usize) -> Self {
        GenerateOptions {
            max_new_tokens: n,
            ..Default::default()
        }
    }

    /// Whether tokens are sampled (any of temperature, top-k, top-p given).
    pub fn sampling(&self) -> bool {
        self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some()
    }

    /// Refuses settings that cannot mean anything, naming the option.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            return Err(Error::Input("max_new_tokens must be at least 1".into()));
        }
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t > 0.0) {
                return Err(Error::Input(format!(
                    "temperature must be a positive number, got {t}"
                )));
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::Input("top_k must be at least 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Input(format!("top_p must be in (0, 1], got {p}")));
            }
        }
        Ok(())
    }
}

/// Picks the next token of each row from float32 logits [B, vocab], as transformers' warpers do in
/// order: temperature, top-k, top-p, then a draw (or the argmax when greedy).
pub(crate) struct Sampler {
    opts: GenerateOptions,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub(crate) fn new(opts: &GenerateOptions) -> Self {
        Sampler {
            opts: opts.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(opts.seed.unwrap_or(0)),
        }
    }

    pub(crate) fn next(&mut self, logits: &Tensor) -> Result<Vec<u32>> {
        let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(if self.opts.sampling() {
                self.sample(row)
            } else {
                argmax(&row)
            });
        }
        Ok(out)
    }

    fn sample(&mut self, mut row: Vec<f32>) -> u32 {
        let t = self.opts.temperature.unwrap_or(1.0) as f32;
        row.iter_mut().for_each(|x| *x /= t);
        let mut order: Vec<usize> = (0..row.len()).collect();
        // Descending by logit; ties keep the lower id first, as a stable sort does.
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let mut keep = order.len();
        if let Some(k) = self.opts.top_k {
            keep = keep.min(k.max(1));
        }
        let max = row[order[0]];
        let mut probs: Vec<f64> = order[..keep]
            .iter()
            .map(|&i| ((row[i] - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = self.opts.top_p {
            // The smallest prefix (most likely first) whose mass reaches p; at least one token.
            let mut acc = 0.0;
            let mut n = 0;
            for q in &probs {
                acc += q;
                n += 1;
                if acc >= p {
                    break;
                }
            }
            probs.truncate(n.max(1));
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= total);
        }
        let u: f64 = self.rng.random();
        let mut acc = 0.0;
        for (j, q) in probs.iter().enumerate() {
            acc += q;
            if u < acc {
                return order[j] as u32;
            }
        }
        order[probs.len() - 1] as u32
    }
}

fn argmax(row: &[f32]) -> u32 {
    // The first maximum, as torch.argmax.
    let mut best = 0;
    for (i, x) in row.iter().enumerate() {
        if *x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The end-of-sequence ids: generation_config.json's `eos_token_id`, else config.json's.
pub fn eos_ids(model: &Model) -> Vec<u32> {
    let from = |v: &serde_json::Value| -> Vec<u32> {
        match v {
            serde_json::Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect(),
            _ => vec![],
        }
    };
    if let Some(g) = generation_config(model) {
        if let Some(v) = g.get("eos_token_id") {
            let ids = from(v);
            if !ids.is_empty() {
                return ids;
            }
        }
    }
    model
        .config
        .raw
        .get("eos_token_id")
        .map(from)
        .unwrap_or_default()
}

/// The id written after a row has finished: generation_config's `pad_token_id`, else the first
/// end-of-sequence id, else the model's padding id (as transformers' `generate()`).
pub fn generation_pad_id(model: &Model) -> u32 {
    generation_config(model)
        .and_then(|g| g.get("pad_token_id").and_then(|v| v.as_u64()))
        .map(|x| x as u32)
        .or_else(|| eos_ids(model).first().copied())
        .unwrap_or_else(|| model.pad_id())
}

fn generation_config(model: &Model) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(model.source.join("generation_config.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// One forward of a generation: step number, new token ids [B, T], the mask over past and new
/// tokens [B, past + T], their positions [B, T], and the cache. Returns the logits [B, T, vocab], or
/// `None` when a request stopped the forward.
pub(crate) type StepFn<'a> =
    dyn FnMut(usize, &Tensor, &Tensor, &Tensor, &KvCache) -> Result<Option<Tensor>> + 'a;

/// What the loop produced.
pub(crate) struct Generated {
    /// [B, T + N] int64: the prompt ids as given, then the new tokens.
    pub output_ids: Tensor,
    /// [B, new] new tokens only.
    pub new_tokens: Vec<Vec<u32>>,
    /// The logits each new token was picked from, [B, vocab] each.
    pub scores: Vec<Tensor>,
    /// Whether the loop ended because a request stopped a forward.
    pub stopped: bool,
}

/// The generation loop over already-encoded ids [B, T] and mask [B, T].
pub(crate) fn generate_loop(
    model: &Model,
    ids: &Tensor,
    mask: &Tensor,
    opts: &GenerateOptions,
    step_fn: &mut StepFn<'_>,
) -> Result<Generated> {
    let device: Device = model.device.clone();
    let (b, _) = ids.dims2()?;
    if let Some(max) = model.max_positions() {
        // The last forward runs at position (longest prompt) + N - 2.
        let real = mask
            .to_dtype(DType::F32)?
            .sum(1)?
            .max(0)?
            .to_scalar::<f32>()? as usize;
        if real + opts.max_new_tokens - 1 > max {
            return Err(Error::Input(format!(
                "{real} prompt tokens + {} new tokens is past the {max} positions this model supports ({})",
                opts.max_new_tokens, model.arch.model_type
            )));
        }
    }
    let eos = if opts.ignore_eos {
        vec![]
    } else {
        eos_ids(model)
    };
    let pad = generation_pad_id(model);
    let mut sampler = Sampler::new(opts);
    // Room for every position the loop feeds: the prompt, then N - 1 new tokens.
    let cache = KvCache::with_capacity(ids.dim(1)? + opts.max_new_tokens.saturating_sub(1));
    let mut mask = mask.to_dtype(DType::U32)?;
    let mut step_ids = ids.to_dtype(DType::U32)?;
    let mut unfinished = vec![true; b];
    let mut new_tokens: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut scores = Vec::new();
    let mut stopped = false;
    for step in 0..opts.max_new_tokens {
        let mut past = cache.seq_len();
        if model.net.restart_cache(past, past + step_ids.dim(1)?) {
            // Run the whole sequence again on an empty cache (Phi-3's LongRoPE switch).
            cache.clear();
            past = 0;
            let mut all = ids.to_dtype(DType::U32)?;
            if !new_tokens[0].is_empty() {
                let n = new_tokens[0].len();
                let flat: Vec<u32> = new_tokens.iter().flatten().copied().collect();
                all = Tensor::cat(&[&all, &Tensor::from_vec(flat, (b, n), &device)?], 1)?;
            }
            step_ids = all;
        }
        let positions =
            crate::nn::positions_from_mask(Some(&mask), b, past, step_ids.dim(1)?, &device)?;
        let Some(logits) = step_fn(step, &step_ids, &mask, &positions, &cache)? else {
            stopped = true;
            break;
        };
        let tl = logits.dim(1)?;
        let last = logits
            .narrow(1, tl - 1, 1)?
            .squeeze(1)?
            .to_dtype(DType::F32)?;
        let picked = sampler.next(&last)?;
        scores.push(last);
        let mut next = Vec::with_capacity(b);
        for (row, tok) in picked.into_iter().enumerate() {
            let tok = if unfinished[row] { tok } else { pad };
            if unfinished[row] && eos.contains(&tok) {
                unfinished[row] = false;
            }
            new_tokens[row].push(tok);
            next.push(tok);
        }
        if step + 1 == opts.max_new_tokens || unfinished.iter().all(|u| !u) {
            break;
        }
        step_ids = Tensor::from_vec(next, (b, 1), &device)?;
        mask = Tensor::cat(&[&mask, &Tensor::ones((b, 1), DType::U32, &device)?], 1)?;
    }
    let n = new_tokens.first().map(|r| r.len()).unwrap_or(0);
    let prompt = ids.to_dtype(DType::I64)?;
    let output_ids = if n == 0 {
        prompt
    } else {
        let new: Vec<i64> = new_tokens.iter().flatten().map(|&x| x as i64).collect();
        Tensor::cat(&[&prompt, &Tensor::from_vec(new, (b, n), &device)?], 1)?
    };
    Ok(Generated {
        output_ids,
        new_tokens,
        scores,
        stopped,
    })
}

/// The output head's scope when generation may compute only the last position's logits: the head is
/// a `Linear` and no request of `plan` is in it or in a module that contains it (whose output or
/// calls could see the logits). `None`: compute every position.
fn last_position_head(model: &Model, plan: &crate::trace::Plan) -> Option<crate::trace::Scope> {
    use crate::trace::Target;
    let head = model.names().lm_head.as_str();
    let table = model.module_table();
    let (scope, entry) = table.find(head)?;
    if entry.type_name != "Linear" {
        return None;
    }
    let around_head =
        |path: &str| path.is_empty() || path == head || head.starts_with(&format!("{path}."));
    let touched = plan
        .requests()
        .iter()
        .any(|r| around_head(&table.get(r.path.module).path));
    (!touched).then_some(scope)
}

/// Logits [B, vocab] of the last position of each step, stacked [steps, B, vocab].
pub(crate) fn stack_scores(scores: &[Tensor]) -> Result<Option<Tensor>> {
    if scores.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tensor::stack(scores, 0)?))
}

/// The result of a generation.
#[derive(Debug)]
pub struct GenerateOutput {
    /// [B, T + N] int64: the prompt ids as given (left padding kept), then the new tokens (finished
    /// rows padded).
    pub output_ids: Tensor,
    /// Prompt length T (the padded batch's).
    pub prompt_len: usize,
    /// The float32 logits each new token was picked from, [N, B, vocab].
    pub scores: Option<Tensor>,
    /// Saved values, one entry per step that served them, named `NAME@S`.
    pub saved: Vec<(String, Vec<Tensor>)>,
    /// Each row's continuation, decoded (empty strings without a tokenizer).
    pub texts: Vec<String>,
    /// Whether a `stop_after` request ended the generation early.
    pub stopped: bool,
}

impl GenerateOutput {
    /// The first value saved under `name` (`logits@0`, `layers_output.1@3`, ...).
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        match self.saved.iter().find(|(n, _)| n == name) {
            Some((_, v)) if !v.is_empty() => Ok(&v[0]),
            _ => Err(Error::Hookpoint {
                path: name.into(),
                msg: "was not saved in this generation (names are NAME@STEP)".into(),
                suggestions: crate::nearest(name, self.saved.iter().map(|(n, _)| n.as_str()), 3),
            }),
        }
    }

    /// The new tokens of each row.
    pub fn new_tokens(&self) -> Result<Vec<Vec<u32>>> {
        let n = self.output_ids.dim(1)? - self.prompt_len;
        let v = self
            .output_ids
            .narrow(1, self.prompt_len, n)?
            .to_vec2::<i64>()?;
        Ok(v.into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect())
    }
}

/// Decodes each row's new tokens (skipping special tokens) with the model's tokenizer.
pub(crate) fn decode_rows(model: &Model, rows: &[Vec<u32>]) -> Result<Vec<String>> {
    let Some(tok) = model.tokenizer.as_ref() else {
        return Ok(vec![String::new(); rows.len()]);
    };
    rows.iter()
        .map(|r| {
            tok.decode(r, true).map_err(|e| Error::Tokenizer {
                path: model.source.join("tokenizer.json"),
                msg: format!("cannot decode {r:?}: {e}"),
            })
        })
        .collect()
}

/// A generation being set up; [`Generate::run`] runs it.
///
/// It takes the same requests as a trace (`save`, `set`, `edit`, `stop_after`, `steer`,
/// `skip_layer`, `rows`, ...); each applies to every step unless limited with `steps(a, b)` /
/// `steps_from(a)` (nnsight's `tracer.iter[a:b]`; `all()` is the default). A save keeps one value
/// per step, named `NAME@S`. Paths are resolved once, when the request is added; a step with
/// nothing requested runs exactly as a plain cached step.
pub struct Generate<'m> {
    model: &'m Model,
    input: crate::Input,
    opts: GenerateOptions,
    requests: crate::session::Requests,
}

impl Model {
    /// Starts a generation from `input` (prompts are left-padded into one batch).
    pub fn generate(&self, input: crate::Input) -> Generate<'_> {
        Generate {
            model: self,
            input,
            opts: GenerateOptions::default(),
            requests: crate::session::Requests::new(self),
        }
    }

    /// One forward with a key/value cache: `ids` [B, T] are the new tokens, `mask` [B, past + T]
    /// covers the cached and new tokens (`None`: all real), positions are `cumsum(mask) - 1` (pads
    /// at 1). The cache is extended with the new tokens. Returns logits [B, T, vocab].
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &KvCache,
    ) -> Result<Tensor> {
        Ok(self.run_net(ids, mask, None, Some(cache))?)
    }
}

impl<'m> Generate<'m> {
    crate::session::request_methods!();

    /// All options at once.
    pub fn options(mut self, opts: GenerateOptions) -> Self {
        self.opts = opts;
        self
    }
    /// New tokens to generate.
    pub fn max_new_tokens(mut self, n: usize) -> Self {
        self.opts.max_new_tokens = n;
        self
    }
    /// Sample with this temperature.
    pub fn temperature(mut self, t: f64) -> Self {
        self.opts.temperature = Some(t);
        self
    }
    /// Sample among the `k` most likely tokens.
    pub fn top_k(mut self, k: usize) -> Self {
        self.opts.top_k = Some(k);
        self
    }
    /// Sample among the most likely tokens whose mass reaches `p`.
    pub fn top_p(mut self, p: f64) -> Self {
        self.opts.top_p = Some(p);
        self
    }
    /// Seed of the sampler.
    pub fn seed(mut self, seed: u64) -> Self {
        self.opts.seed = Some(seed);
        self
    }
    /// Keep generating after end-of-sequence tokens.
    pub fn ignore_eos(mut self, yes: bool) -> Self {
        self.opts.ignore_eos = yes;
        self
    }

    /// Runs the generation.
    pub fn run(self) -> Result<GenerateOutput> {
        let model = self.model;
        self.opts.validate()?;
        let (ids, mask) = model.encode(&self.input)?;
        let mask = match mask {
            Some(m) => m,
            None => Tensor::ones(ids.dims(), DType::U32, &model.device)?,
        };
        let (b, prompt_len) = ids.dims2()?;
        let plan = self.requests.into_plan();
        plan.check_memory(model, b, prompt_len + self.opts.max_new_tokens)?;
        let mut saved: Vec<(String, Vec<Tensor>)> = Vec::new();
        let mut step_fn = |step: usize,
                           ids: &Tensor,
                           mask: &Tensor,
                           positions: &Tensor,
                           cache: &KvCache|
         -> Result<Option<Tensor>> {
            let out = plan.run(step, || {
                model.run_net(ids, Some(mask), Some(positions), Some(cache))
            })?;
            for (name, vals) in out.saved {
                saved.push((format!("{name}@{step}"), vals));
            }
            Ok(out.output)
        };
        // Only the last position's logits are used when no request reads the output head or a
        // module around it (transformers' `logits_to_keep=1`): the head multiplies one row.
        let _last_only = last_position_head(model, &plan).map(crate::nn::last_position_only);
        let g = generate_loop(model, &ids, &mask, &self.opts, &mut step_fn)?;
        drop(_last_only);
        let texts = decode_rows(model, &g.new_tokens)?;
        Ok(GenerateOutput {
            output_ids: g.output_ids,
            prompt_len,
            scores: stack_scores(&g.scores)?,
            saved,
            texts,
            stopped: g.stopped,
        })
    }
}
