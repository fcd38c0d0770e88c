//! `--sae`, `--splice` and `--clamp`: sparse autoencoders and clamped values on `run` and
//! `generate`.

use clap::Args;
use nnscope::{Attach, Sae};

/// SAE and clamp options shared by `run` and `generate`.
#[derive(Args, Debug, Clone, Default)]
pub struct SaeArgs {
    /// Attach a sparse autoencoder or transcoder: a SAELens folder (cfg.json +
    /// sae_weights.safetensors) or a hub id with a subfolder (`org/repo:folder`), at the hook its
    /// cfg.json names; `DIR=PATH` attaches it at hookpoint PATH instead. Repeatable. Adds
    /// PATH.sae.feature_acts, PATH.sae.reconstruction and PATH.sae.error to what --save and
    /// --clamp take.
    #[arg(long = "sae", value_name = "DIR[=PATH]")]
    pub saes: Vec<String>,
    /// Replace the value at each attached SAE's hook (a transcoder's output hook) by its
    /// reconstruction.
    #[arg(long, requires = "saes")]
    pub splice: bool,
    /// Set element INDEX of NAME's last axis to VALUE at every position: an SAE feature
    /// (`H.sae.feature_acts:INDEX=VALUE`, the reconstruction error kept), an MLP neuron, a residual
    /// dimension. Repeatable.
    #[arg(long = "clamp", value_name = "NAME:INDEX=VALUE")]
    pub clamps: Vec<String>,
}

/// One `--clamp`.
#[derive(Debug, Clone, PartialEq)]
pub struct Clamp {
    /// The hookpoint.
    pub name: String,
    /// Element of its last axis.
    pub index: usize,
    /// The value it is set to.
    pub value: f64,
}

/// Parses `NAME:INDEX=VALUE`.
pub fn parse_clamp(s: &str) -> Result<Clamp, String> {
    let bad = |why: &str| {
        format!("--clamp `{s}`: {why} (expected NAME:INDEX=VALUE, e.g. layers_output.0.sae.feature_acts:12=5.0)")
    };
    let (name, rest) = s.rsplit_once(':').ok_or_else(|| bad("no `:`"))?;
    let (index, value) = rest.split_once('=').ok_or_else(|| bad("no `=`"))?;
    if name.is_empty() {
        return Err(bad("no NAME"));
    }
    let index = index
        .trim()
        .parse::<usize>()
        .map_err(|_| bad(&format!("`{index}` is not an index")))?;
    let value = value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| bad(&format!("`{value}` is not a finite number")))?;
    Ok(Clamp {
        name: name.to_string(),
        index,
        value,
    })
}

impl SaeArgs {
    /// The SAEs to attach, loaded (`DIR` or `DIR=PATH`).
    pub fn attachments(&self) -> Result<Vec<Attach>, String> {
        let mut out = Vec::new();
        for spec in &self.saes {
            let (dir, at) = match spec.split_once('=') {
                Some((d, p)) if !p.is_empty() => (d, Some(p)),
                Some(_) => return Err(format!("--sae `{spec}`: nothing after `=`")),
                None => (spec.as_str(), None),
            };
            let sae = Sae::load(dir).map_err(|e| crate::err(format!("--sae {dir}: {e}")))?;
            let mut a = Attach::from(sae).splice(self.splice);
            if let Some(p) = at {
                a = a.at(p);
            }
            out.push(a);
        }
        Ok(out)
    }

    /// The `--clamp`s, parsed.
    pub fn clamps(&self) -> Result<Vec<Clamp>, String> {
        self.clamps.iter().map(|c| parse_clamp(c)).collect()
    }
}

/// Attaches the SAEs and adds the clamps of `$args` (a [`SaeArgs`]) to the builder `$b` (a trace
/// or a generation), evaluating to the builder or returning the error.
macro_rules! apply_sae_args {
    ($b:expr, $args:expr) => {{
        let mut b = $b;
        for a in $args.attachments()? {
            b = b.sae(a).map_err($crate::err)?;
        }
        for c in $args.clamps()? {
            b = b.clamp(&c.name, c.index, c.value).map_err($crate::err)?;
        }
        b
    }};
}
pub(crate) use apply_sae_args;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_parse() {
        let c = parse_clamp("blocks.0.hook_resid_post.sae.feature_acts:12=-2.5").unwrap();
        assert_eq!(c.name, "blocks.0.hook_resid_post.sae.feature_acts");
        assert_eq!((c.index, c.value), (12, -2.5));
        assert!(parse_clamp("layers_output.0:x=1").is_err());
        assert!(parse_clamp("layers_output.0=1").is_err());
        assert!(parse_clamp("layers_output.0:1=nan").is_err());
        assert!(parse_clamp(":1=2").is_err());
    }
}
