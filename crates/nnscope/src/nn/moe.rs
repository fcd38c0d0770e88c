//! Mixture-of-experts pieces transformers 5.24 shares between its MoE models: the top-k router
//! (`MixtralTopKRouter`, `Qwen3MoeTopKRouter`, ...), the fused experts module (`MixtralExperts`,
//! `Qwen2MoeExperts`, `Qwen3MoeExperts`: every expert's weights as 3-D tensors) and the
//! `expert_hit` loop they run.
//!
//! Only the experts some token is routed to are computed, each on its own tokens (gathered with
//! `index_select`, added back with `index_add`), as transformers does.

use super::functional as F;
use super::{Activation, Builder};
use crate::nn;
use crate::trace::{hooked, Scope};
use candle_core::{DType, Result, Tensor, D};

/// The tokens one expert is routed: which rows of the flattened hidden states, and where each
/// (token, top-k slot) weight sits in the flattened [tokens * top_k] routing weights.
#[derive(Debug, Clone)]
pub struct ExpertHit {
    /// Expert index.
    pub expert: usize,
    /// Token rows (u32), in `torch.where` order (by top-k slot, then token).
    pub token_idx: Tensor,
    /// Flat indices (u32) of the matching routing weights: token * top_k + slot.
    pub weight_idx: Tensor,
}

/// The experts some token is routed to, ascending (the `expert_hit` loop of the Hugging Face experts
/// modules). Indices outside `0..num_experts` are skipped, as 5.24 skips its masking index.
pub fn expert_hits(top_k_index: &Tensor, num_experts: usize) -> Result<Vec<ExpertHit>> {
    let idx = top_k_index.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let top_k = idx.first().map_or(0, |r| r.len());
    let mut per_expert: Vec<(Vec<u32>, Vec<u32>)> = vec![(Vec::new(), Vec::new()); num_experts];
    for slot in 0..top_k {
        for (token, row) in idx.iter().enumerate() {
            let e = row[slot] as usize;
            if let Some((tokens, weights)) = per_expert.get_mut(e) {
                tokens.push(token as u32);
                weights.push((token * top_k + slot) as u32);
            }
        }
    }
    let device = top_k_index.device();
    per_expert
        .into_iter()
        .enumerate()
        .filter(|(_, (t, _))| !t.is_empty())
        .map(|(expert, (t, w))| {
            let n = t.len();
            Ok(ExpertHit {
                expert,
                token_idx: Tensor::from_vec(t, n, device)?,
                weight_idx: Tensor::from_vec(w, n, device)?,
            })
        })
        .collect()
}

/// Where a checkpoint may store one expert's weights instead of the fused tensors: a weight prefix
/// and the names of its gate, up and down projections under `<prefix>.<expert>.` (transformers'
/// `save_pretrained` writes `experts.E.gate_proj/up_proj/down_proj`; Mixtral's hub checkpoints
/// `block_sparse_moe.experts.E.w1/w3/w2`).
pub struct PerExpertLayout<'a> {
    /// The weight prefix holding `<expert>.<name>.weight`.
    pub vb: Builder<'a>,
    /// Gate, up and down projection names.
    pub names: [&'static str; 3],
}

/// The fused experts module (`mlp.experts`): `gate_up_proj` [E, 2I, H] (gate rows, then up rows)
/// and `down_proj` [E, H, I].
pub struct Experts {
    /// [num_experts, 2 * intermediate, hidden]: gate rows then up rows.
    pub gate_up_proj: Tensor,
    /// [num_experts, hidden, intermediate].
    pub down_proj: Tensor,
    num_experts: usize,
    act_fn: Activation,
    scope: Scope,
}

impl Experts {
    /// Loads the fused tensors at `vb` (`gate_up_proj`, `down_proj`), or else stacks per-expert
    /// weights from the first of `layouts` that holds expert 0. `vb` is also the module's path.
    pub fn new(
        num_experts: usize,
        hidden: usize,
        intermediate: usize,
        act_fn: Activation,
        vb: Builder,
        layouts: &[PerExpertLayout],
    ) -> Result<Self> {
        let (e, h, i) = (num_experts, hidden, intermediate);
        let layout = layouts
            .iter()
            .find(|l| l.vb.contains(&format!("0.{}.weight", l.names[0])));
        let (gate_up_proj, down_proj) = match layout {
            Some(l) if !vb.contains("gate_up_proj") => {
                let mut gate_up = Vec::with_capacity(e);
                let mut down = Vec::with_capacity(e);
                for x in 0..e {
                    let vx = l.vb.pp(x);
                    let gate = vx.pp(l.names[0]).get((i, h), "weight")?;
                    let up = vx.pp(l.names[1]).get((i, h), "weight")?;
                    gate_up.push(Tensor::cat(&[&gate, &up], 0)?);
                    down.push(vx.pp(l.names[2]).get((h, i), "weight")?);
                }
                (Tensor::stack(&gate_up, 0)?, Tensor::stack(&down, 0)?)
            }
            _ => (
                vb.get((e, 2 * i, h), "gate_up_proj")?,
                vb.get((e, h, i), "down_proj")?,
            ),
        };
        Ok(Experts {
            gate_up_proj,
            down_proj,
            num_experts: e,
            act_fn,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl Experts {
    /// Sum over each token's experts of weight * down(act(gate(x)) * up(x)); `hidden_states` is
    /// [tokens, hidden], `top_k_index` / `top_k_weights` [tokens, top_k].
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        top_k_index: &Tensor,
        top_k_weights: &Tensor,
    ) -> Result<Tensor> {
        let mut final_hidden_states = hidden_states.zeros_like()?;
        let expert_hit = expert_hits(top_k_index, self.num_experts)?;
        let flat_weights = top_k_weights.flatten_all()?;
        for hit in expert_hit.iter() {
            let current_state = hidden_states.index_select(&hit.token_idx, 0)?;
            let gate_up = F::linear(&current_state, &self.gate_up_proj.get(hit.expert)?, None)?;
            let half = gate_up.dim(D::Minus1)? / 2;
            let gate = gate_up.narrow(D::Minus1, 0, half)?;
            let up = gate_up.narrow(D::Minus1, half, half)?;
            let current_hidden_states = (self.act_fn.forward(&gate)? * up)?;
            let current_hidden_states = F::linear(
                &current_hidden_states,
                &self.down_proj.get(hit.expert)?,
                None,
            )?;
            let weights = flat_weights
                .index_select(&hit.weight_idx, 0)?
                .unsqueeze(1)?;
            // torch promotes to the weights' dtype (float32 for Mixtral's router) before the cast back.
            let current_hidden_states = current_hidden_states
                .to_dtype(weights.dtype())?
                .broadcast_mul(&weights)?;
            final_hidden_states = final_hidden_states.index_add(
                &hit.token_idx,
                &current_hidden_states.to_dtype(hidden_states.dtype())?,
                0,
            )?;
        }
        Ok(final_hidden_states)
    }
}

/// The top-k router (`mlp.gate`): softmax over the experts in float32, the top k, optionally
/// renormalized to sum to 1. Its output is (router_logits, router_scores, router_indices): the router
/// logits are `mlp.gate.output.0`.
pub struct TopKRouter {
    /// [num_experts, hidden].
    pub weight: Tensor,
    top_k: usize,
    norm_topk_prob: bool,
    /// Whether the scores go back to the logits' dtype (Qwen) or stay float32 (Mixtral).
    scores_in_logits_dtype: bool,
    hidden_dim: usize,
    scope: Scope,
}

impl TopKRouter {
    /// Loads `weight` [num_experts, hidden] from `weight_vb` (the router's module path is `vb`).
    pub fn new(
        num_experts: usize,
        hidden: usize,
        top_k: usize,
        norm_topk_prob: bool,
        scores_in_logits_dtype: bool,
        vb: Builder,
        weight_vb: &Builder,
    ) -> Result<Self> {
        Ok(TopKRouter {
            weight: weight_vb.get((num_experts, hidden), "weight")?,
            top_k,
            norm_topk_prob,
            scores_in_logits_dtype,
            hidden_dim: hidden,
            scope: vb.scope::<Self>(),
        })
    }
}

#[hooked]
impl TopKRouter {
    /// (router_logits [tokens, E], routing weights [tokens, k], selected experts [tokens, k] u32).
    pub fn forward(&self, hidden_states: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let hidden_states = hidden_states.reshape(((), self.hidden_dim))?;
        let router_logits = F::linear(&hidden_states, &self.weight, None)?;
        let router_probs =
            nn::functional::softmax(&router_logits.to_dtype(DType::F32)?, D::Minus1)?;
        let (router_top_value, router_indices) = F::topk(&router_probs, self.top_k)?;
        let router_top_value = if self.norm_topk_prob {
            router_top_value.broadcast_div(&router_top_value.sum_keepdim(D::Minus1)?)?
        } else {
            router_top_value
        };
        let router_scores = if self.scores_in_logits_dtype {
            router_top_value.to_dtype(router_logits.dtype())?
        } else {
            router_top_value
        };
        Ok((router_logits, router_scores, router_indices))
    }
}
