"""DeepSeek-V3 multi-token prediction: the training loss and greedy speculative decoding.

Module k (``model.model.mtp[k-1]``) reads, at position i, the previous depth's hidden state ``h_i^{k-1}``
and the embedding of token ``t_{i+k}``, and predicts ``t_{i+k+1}`` through the shared output head.
``h^0`` is the main model's final (normalised) hidden state, as transformers' and vLLM's MTP drafters
take it. Loss: ``mtp_loss_weight / D * sum_k CE_k`` (V3 paper, eq. 25).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask


def run_mtp_module(
    model,
    depth: int,
    previous_hidden: torch.Tensor,
    next_token_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache: Cache | None = None,
) -> torch.Tensor:
    """One MTP module of ``model`` (a DeepseekMoEModel) over ``[batch, n]`` positions -> ``[batch, n, hidden]``
    normalised states for the shared head. ``attention_mask`` is the 2-D padding mask of those positions
    (with the cached ones in front when ``cache`` is given)."""
    layer = model.mtp[depth]
    embeds = model.embed_tokens(next_token_ids)
    mask = create_causal_mask(model.config, embeds, attention_mask, cache, position_ids)
    position_embeddings = model.rotary_emb(embeds, position_ids)
    return layer(previous_hidden, embeds, position_embeddings, mask, cache, position_ids=position_ids)


def mtp_loss(causal_lm, hidden_states: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> torch.Tensor:
    """``lambda / D * sum_k CE_k``: depth k predicts ``labels`` shifted by ``k + 1``."""
    model, config = causal_lm.model, causal_lm.config
    length = input_ids.shape[1]
    if position_ids is None:
        position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
    losses, previous = [], hidden_states
    for depth in range(len(model.mtp)):
        shift = depth + 1
        if length <= shift + 1:
            break
        mask = None
        if attention_mask is not None:  # a position counts when both of its tokens are real
            mask = attention_mask[:, :-shift] * attention_mask[:, shift:]
        previous = run_mtp_module(model, depth, previous[:, : length - shift], input_ids[:, shift:],
                                  position_ids[:, : length - shift], mask)
        logits = causal_lm.lm_head(previous)
        # The standard causal-LM loss shifts by one more: position i is scored against labels[i + shift + 1].
        losses.append(causal_lm.loss_function(logits=logits, labels=labels[:, shift:], vocab_size=config.vocab_size))
    if not losses:
        return hidden_states.new_zeros(())
    return config.mtp_loss_weight * torch.stack(losses).mean()


@torch.no_grad()
def speculative_generate(causal_lm, input_ids: torch.Tensor, max_new_tokens: int,
                         eos_token_id: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Greedy decoding where the first MTP module drafts one token and the main model verifies it with the
    next step's forward (two tokens at once). Output equals plain greedy decoding. Batch size 1.
    Returns ``(sequence [1, prompt + new], {"drafted", "accepted", "acceptance_rate", "main_forwards"})``."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative_generate decodes one sequence at a time, got batch {input_ids.shape[0]}")
    model = causal_lm.model
    if not len(model.mtp):
        raise ValueError("this model has no MTP module (num_nextn_predict_layers = 0)")
    cache, mtp_cache = DynamicCache(config=causal_lm.config), DynamicCache()
    out = model(input_ids, cache=cache, use_cache=True)
    hidden = out.last_hidden_state  # [1, prompt, hidden]
    token = causal_lm.lm_head(hidden[:, -1:]).argmax(-1)  # [1, 1], certain
    generated = [token]
    position = input_ids.shape[1]
    # The MTP module has seen no position yet: feed the whole prompt (h_i with t_{i+1}).
    draft = _draft(causal_lm, hidden, torch.cat((input_ids[:, 1:], token), dim=1), 0, mtp_cache)
    drafted = accepted = 0
    main_forwards = 1
    while sum(t.shape[1] for t in generated) < max_new_tokens and int(token) != eos_token_id:
        step = model(torch.cat((token, draft), dim=1), cache=cache, use_cache=True,
                     position_ids=torch.tensor([[position, position + 1]], device=input_ids.device))
        main_forwards += 1
        predictions = causal_lm.lm_head(step.last_hidden_state).argmax(-1)  # [1, 2]
        drafted += 1
        if int(predictions[0, 0]) == int(draft):
            accepted += 1
            new_tokens, token = torch.cat((draft, predictions[:, 1:]), dim=1), predictions[:, 1:]
            verified_hidden = step.last_hidden_state
        else:
            cache.crop(-1)  # forget the rejected draft's keys
            new_tokens, token = predictions[:, :1], predictions[:, :1]
            verified_hidden = step.last_hidden_state[:, :1]
        mtp_next = new_tokens  # the tokens at positions (verified + 1)
        draft = _draft(causal_lm, verified_hidden, mtp_next, position, mtp_cache)
        position += verified_hidden.shape[1]
        generated.append(new_tokens)
    sequence = torch.cat([input_ids, *generated], dim=1)[:, : input_ids.shape[1] + max_new_tokens]
    if eos_token_id is not None:
        hits = (sequence[0, input_ids.shape[1]:] == eos_token_id).nonzero()
        if len(hits):
            sequence = sequence[:, : input_ids.shape[1] + int(hits[0]) + 1]
    stats = {"drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / max(drafted, 1),
             "main_forwards": main_forwards}
    return sequence, stats


def _draft(causal_lm, hidden: torch.Tensor, next_tokens: torch.Tensor, start: int, mtp_cache: Cache) -> torch.Tensor:
    """Run MTP depth 1 on new positions ``start ..`` and return its greedy guess for the token after them."""
    positions = torch.arange(start, start + hidden.shape[1], device=hidden.device).unsqueeze(0)
    states = run_mtp_module(causal_lm.model, 0, hidden, next_tokens, positions, cache=mtp_cache)
    return causal_lm.lm_head(states[:, -1:]).argmax(-1)
