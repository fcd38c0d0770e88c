//! config.json, read as JSON with typed accessors whose errors name the file and the key.

use crate::{Error, Result};
use serde_json::Value;
use std::path::PathBuf;

/// A model's config.json.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from (for messages).
    pub path: PathBuf,
    /// The parsed JSON object.
    pub raw: serde_json::Map<String, Value>,
}

impl Config {
    /// A config error naming this file.
    pub fn error(&self, msg: impl Into<String>) -> Error {
        Error::Config {
            path: self.path.clone(),
            msg: msg.into(),
        }
    }

    /// An integer under any of `keys` (a class attribute and its `attribute_map` aliases), else
    /// `default`, as the Hugging Face config class reads it.
    pub fn usize_alias_or(&self, keys: &[&str], default: usize) -> Result<usize> {
        match self.get(keys) {
            Some(_) => self.usize(keys),
            None => Ok(default),
        }
    }

    /// Parses config.json text.
    pub fn parse(path: PathBuf, text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.clone(),
            msg: format!("not valid JSON: {e}"),
        })?;
        match v {
            Value::Object(raw) => Ok(Config { path, raw }),
            _ => Err(Error::Config {
                path,
                msg: "expected a JSON object at the top level".into(),
            }),
        }
    }

    /// A config from a JSON object (tests, generated checkpoints).
    pub fn from_value(v: Value) -> Result<Self> {
        match v {
            Value::Object(raw) => Ok(Config {
                path: PathBuf::from("<config>"),
                raw,
            }),
            _ => Err(Error::Config {
                path: PathBuf::from("<config>"),
                msg: "expected a JSON object".into(),
            }),
        }
    }

    fn bad(&self, key: &str, want: &str, got: &Value) -> Error {
        Error::Config {
            path: self.path.clone(),
            msg: format!("key `{key}` should be {want}, found {got}"),
        }
    }

    fn missing(&self, key: &str) -> Error {
        Error::Config {
            path: self.path.clone(),
            msg: format!("missing key `{key}`"),
        }
    }

    /// The first of `keys` present and not null.
    pub fn get<'k>(&self, keys: &[&'k str]) -> Option<(&'k str, &Value)> {
        keys.iter()
            .find_map(|k| self.raw.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)))
    }

    /// A required non-negative integer under any of `keys` (aliases: `n_embd`/`hidden_size`).
    pub fn usize(&self, keys: &[&str]) -> Result<usize> {
        match self.get(keys) {
            Some((k, v)) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.bad(k, "a non-negative integer", v)),
            None => Err(self.missing(keys[0])),
        }
    }

    /// An optional non-negative integer.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(&[key]) {
            Some((k, v)) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.bad(k, "a non-negative integer", v)),
            None => Ok(None),
        }
    }

    /// An integer with a default.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    /// An optional number.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(&[key]) {
            Some((k, v)) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(k, "a number", v)),
            None => Ok(None),
        }
    }

    /// A number with a default.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    /// A boolean with a default.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(&[key]) {
            Some((k, v)) => v.as_bool().ok_or_else(|| self.bad(k, "true or false", v)),
            None => Ok(default),
        }
    }

    /// A string with a default.
    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(&[key]) {
            Some((k, v)) => v.as_str().ok_or_else(|| self.bad(k, "a string", v)),
            None => Ok(default),
        }
    }

    /// An optional list of strings.
    pub fn opt_str_list(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(&[key]) {
            Some((k, v)) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| self.bad(k, "a list of strings", v))?;
                arr.iter()
                    .map(|x| {
                        x.as_str()
                            .map(String::from)
                            .ok_or_else(|| self.bad(k, "a list of strings", v))
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some)
            }
            None => Ok(None),
        }
    }

    /// An optional list of integers.
    pub fn opt_usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.get(&[key]) {
            Some((k, v)) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| self.bad(k, "a list of integers", v))?;
                arr.iter()
                    .map(|x| {
                        x.as_u64()
                            .map(|x| x as usize)
                            .ok_or_else(|| self.bad(k, "a list of integers", v))
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some)
            }
            None => Ok(None),
        }
    }

    /// A nested object as a config of its own (DBRX's `attn_config`), empty when absent.
    pub fn sub(&self, key: &str) -> Result<Config> {
        match self.raw.get(key) {
            Some(Value::Object(m)) => Ok(Config {
                path: self.path.clone(),
                raw: m.clone(),
            }),
            None | Some(Value::Null) => Ok(Config {
                path: self.path.clone(),
                raw: Default::default(),
            }),
            Some(v) => Err(self.bad(key, "an object", v)),
        }
    }

    /// `model_type`.
    pub fn model_type(&self) -> Result<&str> {
        match self.raw.get("model_type") {
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.bad("model_type", "a string", v)),
            None => Err(self.missing("model_type")),
        }
    }

    /// Per-layer attention types: `layer_types` when given, else derived from `use_sliding_window`,
    /// `sliding_window` and `max_window_layers` the way the Qwen2 / Mistral configs do.
    pub fn layer_types(&self, n_layers: usize, sliding_by_default: bool) -> Result<Vec<bool>> {
        if let Some(lt) = self.opt_str_list("layer_types")? {
            if lt.len() < n_layers {
                return Err(Error::Config {
                    path: self.path.clone(),
                    msg: format!(
                        "`layer_types` has {} entries for {n_layers} layers",
                        lt.len()
                    ),
                });
            }
            return Ok(lt
                .iter()
                .take(n_layers)
                .map(|t| t == "sliding_attention")
                .collect());
        }
        let window = self.opt_usize("sliding_window")?;
        let use_sw = self.bool_or("use_sliding_window", sliding_by_default)?;
        let max_window_layers = self.opt_usize("max_window_layers")?;
        Ok((0..n_layers)
            .map(|i| {
                use_sw && window.is_some_and(|w| w > 0) && max_window_layers.is_none_or(|m| i >= m)
            })
            .collect())
    }
}
