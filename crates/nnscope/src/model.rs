//! A loaded model: the network, its module tree, config, tokenizer and standard names.

use crate::config::Config;
use crate::models::{architecture, Architecture, CausalLM, ARCHITECTURES};
use crate::nn::Builder;
use crate::standard::StandardNames;
use crate::trace::{HookPath, ModuleTable, Structure, Target};
use crate::{hub, Error, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype (weights are converted on load). Default float32.
    pub dtype: DType,
    /// Device. Default CPU.
    pub device: Device,
    /// Show a progress bar while reading weights.
    pub progress: bool,
    /// Overrides of the standard-name renaming (see [`crate::standard::RenameConfig`]).
    pub rename: crate::standard::RenameConfig,
    /// Check the standard names on a two-token input at load (nnterp's `check_model_renaming`).
    pub check_renaming: bool,
    /// Branch, tag or commit of a hub id (default `main`).
    pub revision: Option<String>,
    /// Never download: a hub id must be in the local cache (also set by `HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            progress: false,
            rename: Default::default(),
            check_renaming: true,
            revision: None,
            offline: false,
        }
    }
}

/// Model inputs: prompts (tokenized, left-padded) or token ids.
#[derive(Debug, Clone)]
pub enum Input {
    /// Prompts, batched with left padding.
    Prompts(Vec<String>),
    /// Token ids [B, T] (integers), an optional 0/1 attention mask [B, T] and optional explicit
    /// position ids [B, T] (default: `cumsum(attention_mask) - 1`, 1 at padding, as transformers'
    /// `generate()` computes them, so a row of a left-padded batch equals its prompt alone).
    Ids {
        /// [B, T].
        input_ids: Tensor,
        /// [B, T], 1 for real tokens.
        attention_mask: Option<Tensor>,
        /// [B, T] integer positions.
        position_ids: Option<Tensor>,
    },
}

impl Input {
    /// Prompts to tokenize.
    pub fn prompts<S: AsRef<str>>(p: &[S]) -> Self {
        Input::Prompts(p.iter().map(|s| s.as_ref().to_string()).collect())
    }
    /// Token ids without a mask.
    pub fn ids(input_ids: Tensor) -> Self {
        Input::Ids {
            input_ids,
            attention_mask: None,
            position_ids: None,
        }
    }
}

/// A loaded causal language model.
pub struct Model {
    pub(crate) net: Box<dyn CausalLM>,
    pub(crate) modules: ModuleTable,
    /// config.json.
    pub config: Config,
    /// Its registry row.
    pub arch: &'static Architecture,
    /// tokenizer.json, when the folder has one.
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// Where it was loaded from.
    pub source: PathBuf,
    /// Compute dtype.
    pub dtype: DType,
    /// Device.
    pub device: Device,
    pub(crate) names: StandardNames,
    pub(crate) structure: OnceLock<std::result::Result<Structure, String>>,
    pub(crate) vocab_size: usize,
    pub(crate) attn_probs: Option<(String, crate::models::ProbShape)>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("model_type", &self.arch.model_type)
            .field("source", &self.source)
            .field("modules", &self.modules.len())
            .finish()
    }
}

/// Sizes that every architecture divides by or allocates from: zero would divide by zero or build
/// an empty model that computes nothing, so it is refused up front with the key's name.
const POSITIVE_KEYS: &[&str] = &[
    "vocab_size",
    "n_vocab",
    "hidden_size",
    "n_embd",
    "d_model",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "n_inner",
    "num_hidden_layers",
    "n_layer",
];

/// Larger than any of these sizes in a real model; a config beyond it would make the loader try
/// to allocate tables (RoPE frequencies) of that size before any weight could contradict it.
const MAX_SIZE: usize = 1 << 24;

fn check_sizes(config: &Config) -> Result<()> {
    let bad = |msg: String| Error::Config {
        path: config.path.clone(),
        msg,
    };
    for key in POSITIVE_KEYS {
        match config.opt_usize(key)? {
            Some(0) => return Err(bad(format!("key `{key}` is 0; it must be at least 1"))),
            Some(n) if n > MAX_SIZE => {
                return Err(bad(format!(
                    "key `{key}` is {n}, larger than any real model (at most {MAX_SIZE})"
                )))
            }
            _ => {}
        }
    }
    // The rotated fraction of each head: outside (0, 1] it would rotate a negative, empty or
    // larger-than-the-head number of dimensions.
    let mut prf = vec![(
        "partial_rotary_factor".to_string(),
        config.opt_f64("partial_rotary_factor")?,
    )];
    for sub in ["rope_parameters", "rope_scaling"] {
        if let Ok(c) = config.sub(sub) {
            prf.push((
                format!("{sub}.partial_rotary_factor"),
                c.opt_f64("partial_rotary_factor").ok().flatten(),
            ));
        }
    }
    for (key, v) in prf {
        if let Some(v) = v {
            if !(v > 0.0 && v <= 1.0) {
                return Err(bad(format!("key `{key}` is {v:?}; it must be in (0, 1]")));
            }
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

impl Model {
    /// Loads MODEL: a folder with config.json, safetensors weights and tokenizer.json, or a hub id
    /// found in the local Hugging Face cache or downloaded into it (see [`hub::resolve_with`]).
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        let mut hub_opts = hub::HubOptions::from_env();
        hub_opts.revision = opts.revision.clone();
        hub_opts.offline |= opts.offline;
        hub_opts.progress = opts.progress;
        let dir = hub::resolve_with(model, &hub_opts)?;
        let cfg_path = dir.join("config.json");
        if !cfg_path.is_file() {
            return Err(Error::ModelNotFound {
                model: model.into(),
                msg: format!("{} has no config.json", dir.display()),
            });
        }
        let config = Config::parse(cfg_path.clone(), &read(&cfg_path)?)?;
        let files = hub::weight_files(&dir)?;
        let index = hub::read_headers(&files)?;
        let pb = if opts.progress {
            let pb = indicatif::ProgressBar::new_spinner();
            pb.set_message(format!("loading {}", dir.display()));
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            Some(pb)
        } else {
            None
        };
        // SAFETY: memory-mapping is what makes loading large checkpoints cheap. The files are only
        // read, and their headers were validated above; a file changed by another process while
        // mapped is outside what any mmap-based loader can guard against.
        let vb = unsafe {
            // Performance: like `VarBuilder::from_mmaped_safetensors`, but each tensor's mapped pages
            // are released once copied, so loading does not peak at twice the checkpoint (nn/mmap.rs).
            crate::nn::mmap::var_builder(&files, opts.dtype, &opts.device)
        }
        .map_err(|e| Error::Weights {
            path: files[0].clone(),
            msg: e.to_string(),
        })?;
        let model = Self::from_builder(config, Builder::with_index(vb, index), dir.clone(), opts);
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        let mut model = model.map_err(|e| match e {
            Error::Tensor(t) => Error::Weights {
                // The message names the tensor and the file it is in (see `Builder::get`).
                path: if files.len() == 1 {
                    files[0].clone()
                } else {
                    dir.join("model.safetensors.index.json")
                },
                msg: crate::error::candle_message(&t),
            },
            other => other,
        })?;
        // The check runs a trace, which cannot see anything in a build without the `hooks` feature
        // (instrumentation compiled out, used by bench/ to measure its cost).
        if opts.check_renaming && cfg!(feature = "hooks") {
            model.check_renaming()?;
        }
        let tok_path = dir.join("tokenizer.json");
        if tok_path.is_file() {
            let tok =
                tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| Error::Tokenizer {
                    path: tok_path.clone(),
                    msg: e.to_string(),
                })?;
            model.tokenizer = Some(tok);
        }
        Ok(model)
    }

    /// Builds a model from a config and a candle `VarBuilder` (any weight source).
    pub fn from_parts(
        config: Config,
        vb: candle_nn::VarBuilder,
        source: PathBuf,
        opts: &LoadOptions,
    ) -> Result<Self> {
        Self::from_builder(config, Builder::new(vb), source, opts)
    }

    fn from_builder(
        config: Config,
        builder: Builder,
        source: PathBuf,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let model_type = config.model_type()?.to_string();
        let arch = architecture(&model_type).ok_or_else(|| Error::Config {
            path: config.path.clone(),
            msg: format!(
                "unknown model_type `{model_type}`; supported: {}",
                ARCHITECTURES
                    .iter()
                    .map(|a| a.model_type)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
        check_sizes(&config)?;
        let net = (arch.load)(&config, builder.clone())?;
        let modules = builder.table();
        let net_probs = net.attention_probabilities();
        let names = StandardNames::derive(&modules, &opts.rename)?;
        let vocab_size = config.usize(&["vocab_size", "n_vocab"])?;
        Ok(Model {
            net,
            modules,
            config,
            arch,
            tokenizer: None,
            source,
            dtype: opts.dtype,
            device: opts.device.clone(),
            names,
            structure: OnceLock::new(),
            vocab_size,
            // The registry's path, unless this configuration routes attention elsewhere.
            attn_probs: Some((
                net_probs
                    .unwrap_or(arch.attention_probabilities)
                    .to_string(),
                arch.prob_shape,
            )),
        })
    }

    /// The module tree.
    pub fn modules(&self) -> &ModuleTable {
        &self.modules
    }

    /// Standard names of this model's modules.
    pub fn names(&self) -> &StandardNames {
        &self.names
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.names.num_layers
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// A plain forward: logits [B, T, vocab].
    pub fn forward(&self, input: &Input) -> Result<Tensor> {
        let (ids, mask) = self.encode(input)?;
        let positions = self.input_positions(input, &ids)?;
        Ok(self.run_net(&ids, mask.as_ref(), positions.as_ref(), None)?)
    }

    /// Explicit position ids of an input, checked against its token ids ([B, T] integers).
    pub fn input_positions(&self, input: &Input, ids: &Tensor) -> Result<Option<Tensor>> {
        let Input::Ids {
            position_ids: Some(p),
            ..
        } = input
        else {
            return Ok(None);
        };
        if p.dims() != ids.dims() {
            return Err(Error::Input(format!(
                "position_ids has shape {:?} but input_ids has shape {:?}",
                p.dims(),
                ids.dims()
            )));
        }
        if p.dtype().is_float() {
            return Err(Error::Input(format!(
                "position_ids must be integers, got {:?}",
                p.dtype()
            )));
        }
        let v = p.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        if let Some(bad) = v.iter().find(|x| **x < 0) {
            return Err(Error::Input(format!(
                "position_ids must be non-negative, found {bad}"
            )));
        }
        if let (Some(max), Some(top)) = (self.max_positions(), v.iter().max()) {
            if *top as usize >= max {
                return Err(Error::Input(format!(
                    "position id {top} is past the {max} positions this model supports ({})",
                    self.arch.model_type
                )));
            }
        }
        Ok(Some(p.to_dtype(DType::I64)?.to_device(&self.device)?))
    }

    /// The one place the network runs: positions default to `cumsum(mask) - 1` over the cached and
    /// new tokens (pads at 1); `mask` covers past + new tokens when a cache is given.
    pub(crate) fn run_net(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        positions: Option<&Tensor>,
        cache: Option<&crate::nn::KvCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let computed;
        let positions = match positions {
            Some(p) => p,
            None => {
                let past = crate::nn::past_len(cache);
                computed = crate::nn::positions_from_mask(mask, b, past, t, &self.device)?;
                &computed
            }
        };
        self.net.forward(ids, mask, positions, cache)
    }

    /// The token ids and attention mask for an input, validated.
    pub fn encode(&self, input: &Input) -> Result<(Tensor, Option<Tensor>)> {
        match input {
            Input::Prompts(p) => self.tokenize(p),
            Input::Ids {
                input_ids,
                attention_mask,
                ..
            } => {
                self.check_ids(input_ids, attention_mask.as_ref())?;
                let ids = input_ids.to_dtype(DType::U32)?.to_device(&self.device)?;
                let mask = match attention_mask {
                    Some(m) => Some(m.to_dtype(DType::U32)?.to_device(&self.device)?),
                    None => None,
                };
                Ok((ids, mask))
            }
        }
    }

    fn check_ids(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<()> {
        let (b, t) = ids.dims2().map_err(|_| {
            Error::Input(format!(
                "input_ids must be 2-D [batch, tokens], got shape {:?}",
                ids.dims()
            ))
        })?;
        if b == 0 || t == 0 {
            return Err(Error::Input(format!(
                "empty input: input_ids has shape {:?}",
                ids.dims()
            )));
        }
        if ids.dtype().is_float() {
            return Err(Error::Input(format!(
                "input_ids must be integers, got {:?}",
                ids.dtype()
            )));
        }
        if let Some(m) = mask {
            if m.dims() != ids.dims() {
                return Err(Error::Input(format!(
                    "attention_mask has shape {:?} but input_ids has shape {:?}",
                    m.dims(),
                    ids.dims()
                )));
            }
            // Anything but 0/1 would be truncated to an integer mask and silently mean something else.
            let mv = m.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            if let Some((i, bad)) = mv
                .iter()
                .enumerate()
                .find(|(_, x)| **x != 0.0 && **x != 1.0)
            {
                return Err(Error::Input(format!(
                    "attention_mask must hold only 0 and 1, found {bad} at position {} of sequence {}",
                    i % t,
                    i / t
                )));
            }
        }
        let v = ids.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        if let Some((i, bad)) = v
            .iter()
            .enumerate()
            .find(|(_, x)| **x < 0 || **x as usize >= self.vocab_size)
        {
            return Err(Error::Input(format!(
                "token id {bad} at position {} of sequence {} is outside the vocabulary (size {})",
                i % t,
                i / t,
                self.vocab_size
            )));
        }
        if let Some(max) = self.max_positions() {
            if t > max {
                return Err(Error::Input(format!(
                    "{t} tokens is longer than the {max} positions this model supports ({})",
                    self.arch.model_type
                )));
            }
        }
        Ok(())
    }

    /// The longest sequence the model can take, where it has a hard limit (learned positions).
    pub fn max_positions(&self) -> Option<usize> {
        self.net.dims().max_positions
    }

    /// The model's sizes.
    pub fn dims(&self) -> crate::models::Dims {
        self.net.dims()
    }

    /// The id used for left padding: the tokenizer's pad token, else config's `pad_token_id`,
    /// `eos_token_id`, else 0.
    pub fn pad_id(&self) -> u32 {
        let from_cfg = |k: &str| {
            self.config.raw.get(k).and_then(|v| {
                v.as_u64().or_else(|| {
                    v.as_array()
                        .and_then(|a| a.first())
                        .and_then(|x| x.as_u64())
                })
            })
        };
        from_cfg("pad_token_id")
            .or_else(|| from_cfg("eos_token_id"))
            .unwrap_or(0) as u32
    }

    /// Tokenizes prompts and left-pads them into a batch.
    pub fn tokenize<S: AsRef<str>>(&self, prompts: &[S]) -> Result<(Tensor, Option<Tensor>)> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| Error::Tokenizer {
            path: self.source.join("tokenizer.json"),
            msg: "missing: prompts need a tokenizer.json (or pass token ids)".into(),
        })?;
        if prompts.is_empty() {
            return Err(Error::Input("no prompts given".into()));
        }
        let mut seqs = Vec::new();
        for p in prompts {
            let enc = tok.encode(p.as_ref(), true).map_err(|e| Error::Tokenizer {
                path: self.source.join("tokenizer.json"),
                msg: format!("cannot encode {:?}: {e}", p.as_ref()),
            })?;
            if enc.get_ids().is_empty() {
                return Err(Error::Input(format!(
                    "prompt {:?} encodes to no tokens",
                    p.as_ref()
                )));
            }
            seqs.push(enc.get_ids().to_vec());
        }
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let pad = self.pad_id();
        let mut ids = Vec::with_capacity(seqs.len() * t);
        let mut mask = Vec::with_capacity(seqs.len() * t);
        for s in &seqs {
            for _ in s.len()..t {
                ids.push(pad);
                mask.push(0u32);
            }
            ids.extend_from_slice(s);
            mask.extend(std::iter::repeat_n(1u32, s.len()));
        }
        let b = seqs.len();
        let ids = Tensor::from_vec(ids, (b, t), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, t), &self.device)?;
        self.check_ids(&ids, Some(&mask))?;
        Ok((ids, Some(mask)))
    }

    /// nnterp's `check_model_renaming`: every standard module's input and output is
    /// [batch, seq, hidden] on a short input. Fails with the name to pass in a `RenameConfig`.
    pub fn check_renaming(&self) -> Result<()> {
        let hidden = self.hidden_size()?;
        let ids = Tensor::new(
            &[[0u32, 1u32.min(self.vocab_size as u32 - 1)]],
            &self.device,
        )?;
        let names = [
            ("token_embeddings", "embed_tokens"),
            ("layers_input.0", "layers"),
            ("layers_output.0", "layers"),
            ("attentions_output.0", "attention"),
            ("mlps_input.0", "mlp"),
            ("mlps_output.0", "mlp"),
            ("ln_final.output", "ln_final"),
        ];
        // A model without a final norm (post-norm OPT) has no `ln_final` to check.
        let names: Vec<(&str, &str)> = names
            .into_iter()
            .filter(|(n, _)| !n.starts_with("ln_final") || self.names.ln_final.is_some())
            .collect();
        let mut tr = self.trace(Input::ids(ids));
        for &(n, _) in &names {
            tr = tr.save(n)?;
        }
        let out = tr.run()?;
        for &(n, option) in &names {
            let t = out.get(n)?;
            // Embeddings may be narrower than the hidden size (OPT's `word_embed_proj_dim`).
            let ok = if n == "token_embeddings" {
                t.rank() == 3 && t.dims()[..2] == [1, 2]
            } else {
                t.dims() == [1, 2, hidden]
            };
            if !ok {
                return Err(Error::Config {
                    path: self.config.path.clone(),
                    msg: format!(
                        "renaming check failed: `{n}` has shape {:?}, expected [1, 2, {hidden}]; \
                         pass the right module in RenameConfig::{option}",
                        t.dims()
                    ),
                });
            }
        }
        let logits = out.logits.ok_or_else(|| Error::Input("no logits".into()))?;
        if logits.dims() != [1, 2, self.vocab_size] {
            return Err(Error::Config {
                path: self.config.path.clone(),
                msg: format!(
                    "renaming check failed: logits have shape {:?}",
                    logits.dims()
                ),
            });
        }
        Ok(())
    }

    /// The call structure of the forward (which instrumented function each call site enters, and
    /// what each site returns), recorded once by running two tokens.
    pub fn structure(&self) -> Result<&Structure> {
        let r = self.structure.get_or_init(|| {
            let record = || -> Result<Structure> {
                let ids = Tensor::new(
                    &[[0u32, 1u32.min(self.vocab_size as u32 - 1)]],
                    &self.device,
                )?;
                Structure::record(self.modules.len(), || {
                    self.run_net(&ids, None, None, None).map(|_| ())
                })
            };
            record().map_err(|e| e.to_string())
        });
        r.as_ref()
            .map_err(|e| Error::Input(format!("recording the model's call structure failed: {e}")))
    }
}

impl Target for Model {
    fn module_table(&self) -> &ModuleTable {
        &self.modules
    }

    fn call_structure(&self) -> Result<&Structure> {
        self.structure()
    }

    /// Standard names (`layers_output.3`, ...) become module paths ([`crate::standard::expand`]).
    fn expand_path(&self, path: &str) -> Result<String> {
        crate::standard::expand(self, path)
    }

    /// `heads.L` is a view of the output projection's input ([`crate::standard::value_view`]).
    fn value_view(&self, path: &str) -> Result<Option<crate::trace::View>> {
        crate::standard::value_view(self, path)
    }

    fn extra_names(&self) -> &[&'static str] {
        crate::standard::STANDARD_NAMES
    }

    fn estimate_shape(&self, hp: &HookPath, b: usize, t: usize) -> Vec<usize> {
        crate::standard::estimate_shape(self, hp, b, t)
    }

    fn activation_dtype(&self) -> DType {
        self.dtype
    }

    fn activation_device(&self) -> &Device {
        &self.device
    }
}
