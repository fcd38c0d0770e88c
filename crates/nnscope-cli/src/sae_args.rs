//! `--sae`, `--splice` and `--clamp`: sparse autoencoders and clamped values on `run`,
//! `generate` and `collect`.

use clap::Args;
use nnscope::Attach;

/// SAE and clamp options shared by `run`, `generate` and `collect`.
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

pub use nnscope::Clamp;

/// Parses `NAME:INDEX=VALUE` (see [`nnscope::Clamp`]).
pub fn parse_clamp(s: &str) -> Result<Clamp, String> {
    s.parse::<Clamp>().map_err(|e| match e {
        nnscope::Error::Input(m) => format!("--{m}"),
        e => crate::err(e),
    })
}

impl SaeArgs {
    /// The SAEs to attach, loaded (`DIR` or `DIR=PATH`).
    pub fn attachments(&self) -> Result<Vec<Attach>, String> {
        self.saes
            .iter()
            .map(|spec| {
                Attach::parse(spec)
                    .map(|a| a.splice(self.splice))
                    .map_err(|e| crate::err(format!("--sae {spec}: {e}")))
            })
            .collect()
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
