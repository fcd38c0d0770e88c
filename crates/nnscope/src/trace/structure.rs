//! The recorded call structure of a model's forward: for each module, which call sites enter other
//! instrumented functions (their nested `.source`) and what each site returns.

use super::requests::{Ctx, Kind, NONE};
use super::rt::{Activation, FnInfo};
use crate::Result;

/// A scope in the recorded structure.
#[derive(Debug, Clone)]
pub struct SNode {
    /// The instrumented function running in this scope.
    pub info: &'static FnInfo,
    /// What each site that ran returned.
    pub kinds: Vec<(u32, Kind)>,
    /// Call sites that entered an instrumented function, with that function's scope.
    pub calls: Vec<(u32, SNode)>,
}

impl SNode {
    /// The nested scope entered from `site`.
    pub fn call(&self, site: u32) -> Option<&SNode> {
        self.calls.iter().find(|(s, _)| *s == site).map(|(_, n)| n)
    }
    /// What `site` returned, if it ran.
    pub fn kind(&self, site: u32) -> Option<Kind> {
        self.kinds.iter().find(|(s, _)| *s == site).map(|(_, k)| *k)
    }
}

/// The structure of every module that ran.
#[derive(Debug, Clone)]
pub struct Structure {
    /// Indexed by module id; `None` for modules that did not run in the recording pass.
    pub modules: Vec<Option<SNode>>,
}

impl Structure {
    /// Records the structure of a network with `n_modules` modules while `forward` runs (a short
    /// forward of the network, given by the implementer of [`super::Target`]).
    pub fn record(
        n_modules: usize,
        forward: impl FnOnce() -> candle_core::Result<()>,
    ) -> Result<Self> {
        let ctx = Ctx::new(n_modules, true, &[]);
        {
            // SAFETY: `ctx` lives on this frame for the guard's whole life.
            let _act = unsafe { Activation::new(&ctx) };
            forward()?;
        }
        let nodes = ctx.nodes.into_inner();
        fn build(nodes: &[super::requests::Node], i: u32) -> Option<SNode> {
            let n = &nodes[i as usize];
            Some(SNode {
                info: n.info?,
                kinds: n.kinds.clone(),
                calls: n
                    .calls
                    .iter()
                    .filter_map(|(s, c)| build(nodes, *c).map(|sn| (*s, sn)))
                    .collect(),
            })
        }
        let modules = ctx
            .module_nodes
            .into_inner()
            .into_iter()
            .map(|i| if i == NONE { None } else { build(&nodes, i) })
            .collect();
        Ok(Structure { modules })
    }
}
