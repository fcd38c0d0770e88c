//! Pieces the mixture-of-experts blocks share.

use candle_core::{DType, Result, Tensor};

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
