//! `nnscope._nnscope`: the native half of the Python package. A thin layer over the Rust library:
//! the Python half (`python/nnscope/__init__.py`) turns numpy arrays and torch tensors into the
//! plain `(bytes, shape)` pairs this module takes, and the pairs it returns into numpy arrays.
//!
//! Arrays cross the boundary as raw bytes (native-endian float32 or int64) and a shape: no numpy C
//! API, so one abi3 wheel serves every CPython from 3.9 on. The GIL is released while a model
//! runs; a Python `edit` callable re-acquires it for its call, and an exception it raises is kept
//! and re-raised, with its traceback, once the forward has unwound.

use candle_core::{DType, Device, Tensor};
use nnscope::{GenerateOptions, Input, LoadOptions, Model};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyType};
use std::sync::{Arc, Mutex};

/// An array crossing into Python: its bytes (native-endian), shape and dtype (`"float32"` or
/// `"int64"`).
type Array = (Py<PyByteArray>, Vec<usize>, &'static str);

/// Saved values by name, each hookpoint's values in the order they fired.
type Saved = Vec<(String, Vec<Array>)>;

/// Arrays by name (an experiment's outputs).
type Named = Vec<(String, Array)>;

/// The exception class `name` of `nnscope._errors` carrying `msg`.
fn raise(py: Python<'_>, name: &str, msg: String) -> PyErr {
    let cls = py
        .import("nnscope._errors")
        .and_then(|m| m.getattr(name))
        .and_then(|c| c.downcast_into::<PyType>().map_err(PyErr::from));
    match cls {
        Ok(cls) => PyErr::from_type(cls, msg),
        Err(e) => e,
    }
}

/// A library error as the matching exception: hookpoints raise `HookpointError` (a `KeyError`),
/// shapes and dtypes `ShapeError` (a `ValueError`), bad inputs `InputError` (a `ValueError`),
/// loading `LoadError` (an `OSError`), anything else `Error`.
fn to_py(py: Python<'_>, e: nnscope::Error) -> PyErr {
    use nnscope::Error as E;
    let class = match &e {
        E::Hookpoint { .. } => "HookpointError",
        E::ShapeMismatch { .. } | E::DTypeMismatch { .. } => "ShapeError",
        E::Input(_) => "InputError",
        E::Io { .. }
        | E::ModelNotFound { .. }
        | E::Config { .. }
        | E::Weights { .. }
        | E::Tokenizer { .. }
        | E::Hub { .. } => "LoadError",
        _ => "Error",
    };
    raise(py, class, one_line(&e.to_string()))
}

/// A message as one line, without the backtrace candle attaches when `RUST_BACKTRACE` is set.
fn one_line(msg: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for l in msg.lines() {
        let t = l.trim_start();
        let frame = t
            .split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if frame || t.starts_with("stack backtrace:") {
            break;
        }
        if !t.is_empty() {
            out.push(l.trim());
        }
    }
    out.join(" ")
}

fn candle_to_py(py: Python<'_>, e: candle_core::Error) -> PyErr {
    to_py(py, nnscope::Error::from(e))
}

/// The bytes of a float32 slice.
fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte pattern is a valid u8; u8 needs no alignment.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The bytes of an int64 slice.
fn i64_bytes(v: &[i64]) -> &[u8] {
    // SAFETY: as `f32_bytes`.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A tensor as a float32 (or, for integer tensors, int64) array for Python.
fn to_array(py: Python<'_>, t: &Tensor) -> PyResult<Array> {
    let dims = t.dims().to_vec();
    let flat = t
        .flatten_all()
        .and_then(|f| f.to_device(&Device::Cpu))
        .map_err(|e| candle_to_py(py, e))?;
    if t.dtype().is_int() {
        let v = flat
            .to_dtype(DType::I64)
            .and_then(|f| f.to_vec1::<i64>())
            .map_err(|e| candle_to_py(py, e))?;
        Ok((PyByteArray::new(py, i64_bytes(&v)).unbind(), dims, "int64"))
    } else {
        let v = flat
            .to_dtype(DType::F32)
            .and_then(|f| f.to_vec1::<f32>())
            .map_err(|e| candle_to_py(py, e))?;
        Ok((
            PyByteArray::new(py, f32_bytes(&v)).unbind(),
            dims,
            "float32",
        ))
    }
}

/// A float32 tensor from native-endian bytes and a shape.
fn f32_tensor(bytes: &[u8], shape: &[usize]) -> Result<Tensor, String> {
    let n: usize = shape.iter().product();
    if bytes.len() != n * 4 {
        return Err(format!(
            "{} bytes do not make a float32 array of shape {shape:?}",
            bytes.len()
        ));
    }
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).map_err(|e| e.to_string())
}

/// An int64 tensor from native-endian bytes and a shape.
fn i64_tensor(bytes: &[u8], shape: &[usize]) -> Result<Tensor, String> {
    let n: usize = shape.iter().product();
    if bytes.len() != n * 8 {
        return Err(format!(
            "{} bytes do not make an int64 array of shape {shape:?}",
            bytes.len()
        ));
    }
    let v: Vec<i64> = bytes
        .chunks_exact(8)
        .map(|c| i64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).map_err(|e| e.to_string())
}

fn input_err(py: Python<'_>, msg: String) -> PyErr {
    raise(py, "InputError", msg)
}

/// A dtype name as the library's.
fn parse_dtype(py: Python<'_>, s: &str) -> PyResult<DType> {
    match s {
        "float32" | "f32" | "fp32" => Ok(DType::F32),
        "bfloat16" | "bf16" => Ok(DType::BF16),
        "float16" | "f16" | "fp16" | "half" => Ok(DType::F16),
        other => Err(input_err(
            py,
            format!("unknown dtype `{other}`; use \"float32\", \"bfloat16\" or \"float16\""),
        )),
    }
}

/// Where the exception of a Python edit waits while the forward unwinds.
type ErrorSlot = Arc<Mutex<Option<PyErr>>>;

/// A steering request: layers, vector (float32 bytes, shape), factor, token positions.
type SteerRequest = (Vec<usize>, Vec<u8>, Vec<usize>, f64, Option<Vec<usize>>);

/// The requests of a trace or generation, as the Python half passes them.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Requests {
    /// Names to save (already expanded).
    save: Vec<String>,
    /// (name, float32 bytes, shape) replacements.
    set: Vec<(String, Vec<u8>, Vec<usize>)>,
    /// (name, callable) edits.
    edit: Vec<(String, Py<PyAny>)>,
    /// Where to stop the forward.
    stop_after: Option<String>,
    /// (layers, float32 bytes, shape, factor, token positions).
    steer: Vec<SteerRequest>,
    /// Layers to skip.
    skip_layers: Vec<usize>,
    /// Steps (start, end) the requests apply to (generation only).
    steps: Option<(usize, Option<usize>)>,
    /// `nnscope._edit_call(fn, bytearray, shape) -> (bytes, shape)`.
    trampoline: Py<PyAny>,
    /// SAEs to attach: `SPEC` or `SPEC=HOOK` (parsed and loaded by [`nnscope::Attach::parse`]).
    sae: Vec<String>,
    /// Splice every attached SAE.
    splice: bool,
    /// Clamps `NAME:INDEX=VALUE` (parsed by [`nnscope::Clamp`]).
    clamp: Vec<String>,
}

/// The builders' shared request methods, as a trait so one function fills a plan or a generation.
trait Builder: Sized {
    fn save(self, p: &str) -> nnscope::Result<Self>;
    fn set(self, p: &str, v: Tensor) -> nnscope::Result<Self>;
    fn edit(
        self,
        p: &str,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
    ) -> nnscope::Result<Self>;
    fn stop_after(self, p: &str) -> nnscope::Result<Self>;
    fn steer(
        self,
        layers: &[usize],
        v: &Tensor,
        factor: f64,
        pos: Option<&[usize]>,
    ) -> nnscope::Result<Self>;
    fn skip_layers(self, layers: &[usize]) -> nnscope::Result<Self>;
    fn steps(self, a: usize, b: Option<usize>) -> nnscope::Result<Self>;
    fn sae(self, a: nnscope::Attach) -> nnscope::Result<Self>;
    fn clamp(self, p: &str, index: usize, value: f64) -> nnscope::Result<Self>;
}

macro_rules! impl_builder {
    ($t:ty) => {
        impl Builder for $t {
            fn save(self, p: &str) -> nnscope::Result<Self> {
                <$t>::save(self, p)
            }
            fn set(self, p: &str, v: Tensor) -> nnscope::Result<Self> {
                <$t>::set(self, p, v)
            }
            fn edit(
                self,
                p: &str,
                f: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
            ) -> nnscope::Result<Self> {
                <$t>::edit(self, p, f)
            }
            fn stop_after(self, p: &str) -> nnscope::Result<Self> {
                <$t>::stop_after(self, p)
            }
            fn steer(
                self,
                layers: &[usize],
                v: &Tensor,
                factor: f64,
                pos: Option<&[usize]>,
            ) -> nnscope::Result<Self> {
                <$t>::steer(self, layers, v, factor, pos)
            }
            fn skip_layers(self, layers: &[usize]) -> nnscope::Result<Self> {
                <$t>::skip_layers(self, layers)
            }
            fn steps(self, a: usize, b: Option<usize>) -> nnscope::Result<Self> {
                match b {
                    Some(b) => <$t>::steps(self, a, b),
                    None => <$t>::steps_from(self, a),
                }
            }
            fn sae(self, a: nnscope::Attach) -> nnscope::Result<Self> {
                <$t>::sae(self, a)
            }
            fn clamp(self, p: &str, index: usize, value: f64) -> nnscope::Result<Self> {
                <$t>::clamp(self, p, index, value)
            }
        }
    };
}
impl_builder!(nnscope::PlanBuilder<'_>);
impl_builder!(nnscope::generate::Generate<'_>);

/// A Python callable as a library edit: the value goes to Python as a float32 array, the result
/// comes back in the value's dtype. An exception is parked in `slot` and the forward fails.
fn py_edit(
    f: Py<PyAny>,
    trampoline: Py<PyAny>,
    slot: ErrorSlot,
) -> impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static {
    move |t: &Tensor| {
        let dims = t.dims().to_vec();
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let out = Python::with_gil(|py| -> Result<(Vec<u8>, Vec<usize>), ()> {
            let buf = PyByteArray::new(py, f32_bytes(&v));
            let r = trampoline
                .call1(py, (f.clone_ref(py), buf, dims.clone()))
                .and_then(|r| {
                    let (b, s): (Bound<'_, PyBytes>, Vec<usize>) = r.extract(py)?;
                    Ok((b.as_bytes().to_vec(), s))
                });
            r.map_err(|e| {
                if let Ok(mut s) = slot.lock() {
                    s.get_or_insert(e);
                }
            })
        });
        match out {
            Ok((b, s)) => f32_tensor(&b, &s)
                .map_err(candle_core::Error::Msg)?
                .to_dtype(t.dtype())?
                .to_device(t.device()),
            Err(()) => Err(candle_core::Error::Msg(
                "the Python edit function raised an exception".into(),
            )),
        }
    }
}

/// Adds every request to a builder, in this order: the SAEs, clamp, set, edit, steer,
/// skip_layers, save, stop_after (each but the SAEs limited to `steps` when given).
fn add_requests<B: Builder>(
    py: Python<'_>,
    mut b: B,
    r: &Requests,
    slot: &ErrorSlot,
) -> PyResult<B> {
    let e = |e: nnscope::Error| to_py(py, e);
    let steps = |b: B| -> nnscope::Result<B> {
        match r.steps {
            Some((a, end)) => b.steps(a, end),
            None => Ok(b),
        }
    };
    if r.splice && r.sae.is_empty() {
        return Err(input_err(
            py,
            "splice=True splices the attached SAEs: give sae=...".into(),
        ));
    }
    for spec in &r.sae {
        let a = py
            .allow_threads(|| nnscope::Attach::parse(spec))
            .map_err(e)?
            .splice(r.splice);
        b = b.sae(a).map_err(e)?;
    }
    for c in &r.clamp {
        let c: nnscope::Clamp = c.parse().map_err(e)?;
        b = steps(b.clamp(&c.name, c.index, c.value).map_err(e)?).map_err(e)?;
    }
    for (name, bytes, shape) in &r.set {
        let v =
            f32_tensor(bytes, shape).map_err(|m| input_err(py, format!("set `{name}`: {m}")))?;
        b = steps(b.set(name, v).map_err(e)?).map_err(e)?;
    }
    for (name, f) in &r.edit {
        let f = py_edit(f.clone_ref(py), r.trampoline.clone_ref(py), slot.clone());
        b = steps(b.edit(name, f).map_err(e)?).map_err(e)?;
    }
    for (layers, bytes, shape, factor, positions) in &r.steer {
        let v = f32_tensor(bytes, shape).map_err(|m| input_err(py, format!("steer: {m}")))?;
        b = steps(
            b.steer(layers, &v, *factor, positions.as_deref())
                .map_err(e)?,
        )
        .map_err(e)?;
    }
    if !r.skip_layers.is_empty() {
        b = steps(b.skip_layers(&r.skip_layers).map_err(e)?).map_err(e)?;
    }
    for name in &r.save {
        b = steps(b.save(name).map_err(e)?).map_err(e)?;
    }
    if let Some(name) = &r.stop_after {
        b = steps(b.stop_after(name).map_err(e)?).map_err(e)?;
    }
    Ok(b)
}

/// Token ids, mask and positions as the Python half passes them: each (int64 bytes, shape).
type IdArrays = (
    (Vec<u8>, Vec<usize>),
    Option<(Vec<u8>, Vec<usize>)>,
    Option<(Vec<u8>, Vec<usize>)>,
);

fn make_input(
    py: Python<'_>,
    prompts: Option<Vec<String>>,
    ids: Option<IdArrays>,
) -> PyResult<Input> {
    let arr = |what: &str, (b, s): &(Vec<u8>, Vec<usize>)| {
        i64_tensor(b, s).map_err(|m| input_err(py, format!("{what}: {m}")))
    };
    match (prompts, ids) {
        (Some(p), None) => Ok(Input::Prompts(p)),
        (None, Some((ids, mask, pos))) => Ok(Input::Ids {
            input_ids: arr("input_ids", &ids)?,
            attention_mask: mask
                .as_ref()
                .map(|m| arr("attention_mask", m))
                .transpose()?,
            position_ids: pos.as_ref().map(|p| arr("position_ids", p)).transpose()?,
        }),
        (Some(_), Some(_)) => Err(input_err(py, "give prompts or input_ids, not both".into())),
        (None, None) => Err(input_err(
            py,
            "give a prompt, a list of prompts, or input_ids".into(),
        )),
    }
}

/// Every saved value as arrays.
fn saved_arrays(py: Python<'_>, saved: &[(String, Vec<Tensor>)]) -> PyResult<Saved> {
    saved
        .iter()
        .map(|(n, vs)| {
            Ok((
                n.clone(),
                vs.iter()
                    .map(|v| to_array(py, v))
                    .collect::<PyResult<Vec<_>>>()?,
            ))
        })
        .collect()
}

/// A loaded model (the native half of `nnscope.Model`).
#[pyclass(frozen, module = "nnscope._nnscope")]
struct NativeModel {
    inner: Arc<Model>,
}

#[pymethods]
impl NativeModel {
    /// Loads a model folder or hub id.
    #[new]
    #[pyo3(signature = (path, dtype="float32", revision=None, offline=false))]
    fn new(
        py: Python<'_>,
        path: &str,
        dtype: &str,
        revision: Option<String>,
        offline: bool,
    ) -> PyResult<Self> {
        let opts = LoadOptions {
            dtype: parse_dtype(py, dtype)?,
            revision,
            offline,
            ..Default::default()
        };
        let path = path.to_string();
        let m = py
            .allow_threads(move || Model::load(&path, &opts))
            .map_err(|e| to_py(py, e))?;
        Ok(NativeModel { inner: Arc::new(m) })
    }

    /// config.json's `model_type`.
    #[getter]
    fn model_type(&self) -> &'static str {
        self.inner.arch.model_type
    }

    /// Number of decoder layers.
    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.num_layers()
    }

    /// Number of attention heads.
    #[getter]
    fn num_heads(&self) -> usize {
        self.inner.dims().heads
    }

    /// Hidden size.
    #[getter]
    fn hidden_size(&self) -> usize {
        self.inner.dims().hidden
    }

    /// Vocabulary size.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// Compute dtype.
    #[getter]
    fn dtype(&self) -> &'static str {
        match self.inner.dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        }
    }

    /// The folder the model was loaded from.
    #[getter]
    fn path(&self) -> String {
        self.inner.source.display().to_string()
    }

    /// The Hugging Face class (config.json's `architectures[0]`).
    #[getter]
    fn architecture(&self) -> String {
        self.inner.class_name()
    }

    /// Every module's Hugging Face path, in construction order (the root is "").
    fn module_paths(&self) -> Vec<String> {
        self.inner
            .modules()
            .entries
            .iter()
            .map(|e| e.path.clone())
            .collect()
    }

    /// The hookpoint path a standard name stands for.
    fn expand(&self, py: Python<'_>, name: &str) -> PyResult<String> {
        nnscope::standard::expand(&self.inner, name).map_err(|e| to_py(py, e))
    }

    /// The source listing of a module's forward or a nested call, as `nnscope source` prints it.
    fn source(&self, py: Python<'_>, path: &str) -> PyResult<String> {
        let info =
            nnscope::trace::path::resolve_function(&*self.inner, path).map_err(|e| to_py(py, e))?;
        Ok(format!(
            "{}  ({}:{})\n{}",
            info.name,
            info.file,
            info.first_line,
            nnscope::trace::listing(info, None)
        ))
    }

    /// The checks of the attention-probability hookpoint, as JSON (`nnscope check --json`).
    fn check(&self, py: Python<'_>) -> PyResult<String> {
        let m = self.inner.clone();
        let r = py.allow_threads(move || nnscope::discover::check(&m));
        serde_json::to_string(&r).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Discovery of the attention-probability hookpoint, as JSON (`nnscope find-attn-probs
    /// --json`).
    fn find_attention_probabilities(&self, py: Python<'_>) -> PyResult<String> {
        let m = self.inner.clone();
        let d = py
            .allow_threads(move || nnscope::discover::find_attention_probabilities(&m))
            .map_err(|e| to_py(py, e))?;
        serde_json::to_string(&d).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// One forward serving `requests`: (saved, logits or None, input_ids, attention_mask or None).
    #[pyo3(signature = (prompts, ids, requests))]
    #[allow(clippy::type_complexity)]
    fn trace(
        &self,
        py: Python<'_>,
        prompts: Option<Vec<String>>,
        ids: Option<IdArrays>,
        requests: Requests,
    ) -> PyResult<(Saved, Option<Array>, Array, Option<Array>)> {
        let input = make_input(py, prompts, ids)?;
        let slot: ErrorSlot = Arc::new(Mutex::new(None));
        let plan = add_requests(py, self.inner.plan(), &requests, &slot)?.build();
        let m = self.inner.clone();
        let r = py.allow_threads(move || m.run_plan(&plan, &input));
        if let Some(e) = slot.lock().ok().and_then(|mut s| s.take()) {
            return Err(e);
        }
        let out = r.map_err(|e| to_py(py, e))?;
        Ok((
            saved_arrays(py, &out.saved)?,
            out.logits.as_ref().map(|l| to_array(py, l)).transpose()?,
            to_array(py, &out.input_ids)?,
            out.attention_mask
                .as_ref()
                .map(|m| to_array(py, m))
                .transpose()?,
        ))
    }

    /// A generation serving `requests` at every step (or at `requests.steps`):
    /// (saved as NAME@STEP, output_ids, texts, prompt length, scores or None, stopped).
    #[pyo3(signature = (prompts, ids, requests, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn generate(
        &self,
        py: Python<'_>,
        prompts: Option<Vec<String>>,
        ids: Option<IdArrays>,
        requests: Requests,
        max_new_tokens: usize,
        temperature: Option<f64>,
        top_k: Option<usize>,
        top_p: Option<f64>,
        seed: Option<u64>,
        ignore_eos: bool,
    ) -> PyResult<(Saved, Array, Vec<String>, usize, Option<Array>, bool)> {
        let opts = GenerateOptions {
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            ignore_eos,
        };
        opts.validate().map_err(|e| to_py(py, e))?;
        let input = make_input(py, prompts, ids)?;
        let slot: ErrorSlot = Arc::new(Mutex::new(None));
        // The builder borrows the model, so it is made and run inside the GIL-free section; the
        // requests are converted first (that needs the GIL).
        let m = self.inner.clone();
        let gen = add_requests(py, m.generate(input).options(opts), &requests, &slot)?;
        let r = py.allow_threads(move || gen.run());
        if let Some(e) = slot.lock().ok().and_then(|mut s| s.take()) {
            return Err(e);
        }
        let out = r.map_err(|e| to_py(py, e))?;
        Ok((
            saved_arrays(py, &out.saved)?,
            to_array(py, &out.output_ids)?,
            out.texts.clone(),
            out.prompt_len,
            out.scores.as_ref().map(|s| to_array(py, s)).transpose()?,
            out.stopped,
        ))
    }

    /// The logit lens (`nnscope::experiments::lens::logit_lens`): (logits [L, B, T, vocab],
    /// inverse logits or None, last-position probabilities [B, L, vocab], input_ids,
    /// attention_mask or None).
    #[pyo3(signature = (prompts, ids, inverse))]
    #[allow(clippy::type_complexity)]
    fn logit_lens(
        &self,
        py: Python<'_>,
        prompts: Option<Vec<String>>,
        ids: Option<IdArrays>,
        inverse: bool,
    ) -> PyResult<(Array, Option<Array>, Array, Array, Option<Array>)> {
        let input = make_input(py, prompts, ids)?;
        let m = self.inner.clone();
        let (out, probs) = py
            .allow_threads(move || {
                let out = nnscope::experiments::lens::logit_lens(&m, &input, inverse)?;
                let probs = out.last_probs(false)?;
                Ok::<_, nnscope::Error>((out, probs))
            })
            .map_err(|e| to_py(py, e))?;
        Ok((
            to_array(py, &out.logits)?,
            out.inverse.as_ref().map(|t| to_array(py, t)).transpose()?,
            to_array(py, &probs)?,
            to_array(py, &out.input_ids)?,
            out.attention_mask
                .as_ref()
                .map(|t| to_array(py, t))
                .transpose()?,
        ))
    }

    /// Activation and attribution patching (`nnscope::experiments::patching::patch`): the tensors
    /// under the names `nnscope patch --out` writes, and the corrupt prompt's tokens.
    #[pyo3(signature = (clean, corrupt, answer, wrong, heads))]
    fn patch(
        &self,
        py: Python<'_>,
        clean: String,
        corrupt: String,
        answer: String,
        wrong: String,
        heads: bool,
    ) -> PyResult<(Named, Vec<String>)> {
        use nnscope::experiments::patching;
        let m = self.inner.clone();
        let (named, tokens) = py
            .allow_threads(move || {
                let setup = patching::PatchSetup::new(&clean, &corrupt, &answer, &wrong);
                let out = patching::patch(&m, &setup, heads)?;
                Ok::<_, nnscope::Error>((out.named_tensors()?, out.tokens))
            })
            .map_err(|e| to_py(py, e))?;
        let named = named
            .iter()
            .map(|(n, t)| Ok((n.clone(), to_array(py, t)?)))
            .collect::<PyResult<Vec<_>>>()?;
        Ok((named, tokens))
    }

    /// nnterp's `patchscope_lens`: next-token probabilities of the target [sources, layers, vocab].
    #[pyo3(signature = (sources, target, index_to_patch, layers, source_position))]
    fn patchscope_lens(
        &self,
        py: Python<'_>,
        sources: Vec<String>,
        target: Option<String>,
        index_to_patch: i64,
        layers: Option<Vec<usize>>,
        source_position: i64,
    ) -> PyResult<Array> {
        use nnscope::experiments::patchscope;
        let m = self.inner.clone();
        let t = py
            .allow_threads(move || {
                let target = match target {
                    Some(prompt) => patchscope::TargetPrompt {
                        prompt,
                        index_to_patch,
                    },
                    None => patchscope::TargetPrompt::default(),
                };
                let s: Vec<&str> = sources.iter().map(String::as_str).collect();
                patchscope::patchscope_lens(&m, &s, &target, layers.as_deref(), source_position)
            })
            .map_err(|e| to_py(py, e))?;
        to_array(py, &t)
    }

    /// nnterp's `patchscope_generate`: the target's greedy continuation per source.
    #[pyo3(signature = (sources, target, index_to_patch, layer, source_position, max_new_tokens))]
    #[allow(clippy::too_many_arguments)]
    fn patchscope_generate(
        &self,
        py: Python<'_>,
        sources: Vec<String>,
        target: Option<String>,
        index_to_patch: i64,
        layer: usize,
        source_position: i64,
        max_new_tokens: usize,
    ) -> PyResult<Vec<String>> {
        use nnscope::experiments::patchscope;
        let m = self.inner.clone();
        py.allow_threads(move || {
            let target = match target {
                Some(prompt) => patchscope::TargetPrompt {
                    prompt,
                    index_to_patch,
                },
                None => patchscope::TargetPrompt::default(),
            };
            let s: Vec<&str> = sources.iter().map(String::as_str).collect();
            patchscope::patchscope_generate(&m, &s, &target, layer, source_position, max_new_tokens)
        })
        .map_err(|e| to_py(py, e))
    }

    /// Direct logit attribution: (parts as (name, contribution), bias, logit_diff, scale,
    /// residual_error).
    #[pyo3(signature = (prompts, ids, answer, wrong, heads))]
    #[allow(clippy::type_complexity)]
    fn direct_logit_attribution(
        &self,
        py: Python<'_>,
        prompts: Option<Vec<String>>,
        ids: Option<IdArrays>,
        answer: String,
        wrong: String,
        heads: bool,
    ) -> PyResult<(Vec<(String, f32)>, f32, f32, f32, f32)> {
        let input = make_input(py, prompts, ids)?;
        let m = self.inner.clone();
        let a = py
            .allow_threads(move || {
                nnscope::experiments::attribution::direct_logit_attribution(
                    &m, &input, &answer, &wrong, heads,
                )
            })
            .map_err(|e| to_py(py, e))?;
        Ok((a.parts, a.bias, a.logit_diff, a.scale, a.residual_error))
    }

    /// Gradients of the answer's last-position logit (minus the wrong answer's) with respect to
    /// each of `wrt`: (the scalar, [(name, gradient)]).
    #[pyo3(signature = (prompts, ids, wrt, answer, wrong))]
    fn gradients(
        &self,
        py: Python<'_>,
        prompts: Option<Vec<String>>,
        ids: Option<IdArrays>,
        wrt: Vec<String>,
        answer: String,
        wrong: Option<String>,
    ) -> PyResult<(f64, Named)> {
        let input = make_input(py, prompts, ids)?;
        let m = self.inner.clone();
        let (value, grads) = py
            .allow_threads(move || {
                let mut names = Vec::new();
                for w in &wrt {
                    names.extend(m.expand_pattern(w)?);
                }
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                let g = nnscope::experiments::gradients::answer_gradients(
                    &m,
                    &input,
                    &refs,
                    &answer,
                    wrong.as_deref(),
                )?;
                let grads: Vec<(String, Tensor)> =
                    g.grads.into_iter().map(|(n, _, grad)| (n, grad)).collect();
                Ok::<_, nnscope::Error>((g.value, grads))
            })
            .map_err(|e| to_py(py, e))?;
        let grads = grads
            .iter()
            .map(|(n, t)| Ok((n.clone(), to_array(py, t)?)))
            .collect::<PyResult<Vec<_>>>()?;
        Ok((value, grads))
    }

    /// nnterp's `run_prompts`: per category, the target tokens' probability [P] (or [P, layers]).
    #[pyo3(signature = (prompts, categories, per_layer))]
    fn run_prompts(
        &self,
        py: Python<'_>,
        prompts: Vec<String>,
        categories: Vec<(String, Vec<String>)>,
        per_layer: bool,
    ) -> PyResult<Named> {
        use nnscope::experiments::prompts as pr;
        let m = self.inner.clone();
        let res = py
            .allow_threads(move || {
                let words: Vec<Vec<&str>> = categories
                    .iter()
                    .map(|(_, w)| w.iter().map(String::as_str).collect())
                    .collect();
                let cats: Vec<(&str, &[&str])> = categories
                    .iter()
                    .zip(&words)
                    .map(|((c, _), w)| (c.as_str(), w.as_slice()))
                    .collect();
                let ps = prompts
                    .iter()
                    .map(|p| pr::Prompt::from_words(&m, p, &cats))
                    .collect::<nnscope::Result<Vec<_>>>()?;
                pr::run_prompts(&m, &ps, per_layer)
            })
            .map_err(|e| to_py(py, e))?;
        res.iter()
            .map(|(n, t)| Ok((n.clone(), to_array(py, t)?)))
            .collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "nnscope.Model({:?}, model_type={:?}, dtype={:?})",
            self.inner.source.display().to_string(),
            self.inner.arch.model_type,
            self.dtype()
        )
    }
}

/// Keeps freed tensor memory in the process between operations instead of returning it to the
/// OS (glibc's malloc thresholds; process-wide, so opt-in). Returns whether it took effect.
#[pyfunction]
fn keep_freed_memory() -> bool {
    nnscope::keep_freed_memory()
}

/// The native half of the `nnscope` package.
#[pymodule]
fn _nnscope(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeModel>()?;
    m.add_function(wrap_pyfunction!(keep_freed_memory, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
