"""The base model and its heads (causal LM, sequence classification) for DeepSeekMoE (V1), DeepSeek-V2 and
DeepSeek-V3.

The three families share every class here; they differ only through their config (attention type,
router semantics) and the thin ``DeepseekMoEV{1,2,3}*`` subclasses at the bottom that bind a config class.
Checkpoints are read (:mod:`.loading`) and written (:mod:`.saving`) in DeepSeek's official layout.
"""

# (No `from __future__ import annotations`: transformers reads the output fields of `forward`'s return
# annotation, which must be a class, not a string.)
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import MultiHeadAttention, MultiHeadLatentAttention
from .loading import load_pretrained
from .saving import save_official_checkpoint
from .compat import CACHE_NAME, accepts_both_cache_names, output_cache, with_cache
from .configuration import DeepseekMoEConfig, DeepseekMoEV1Config, DeepseekMoEV2Config, DeepseekMoEV3Config
from .decoder import DeepseekMoEDecoderLayer, MultiTokenPredictionLayer
from .experts import ExpertChunk
from .fp8 import FP8Linear
from .linear import linear_layer
from .mtp import mtp_loss, speculative_generate
from .norm import RMSNorm
from .rope import RotaryEmbedding
from .routing import RouterOutput, TopKRouter
from .load_balancing import balance_loss
from .training import attach_training_hooks, router_statistics


class DeepseekMoEPreTrainedModel(PreTrainedModel):
    config_class = DeepseekMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # The smallest units a device_map may place: a decoder layer can be split (its residual adds and the
    # MoE block move tensors where needed), so a layer's expert chunks can live apart from its attention.
    _no_split_modules = ["MultiHeadAttention", "MultiHeadLatentAttention", "DenseMLP", "TopKRouter", "ExpertChunk", "RMSNorm"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # compile and export take the sync-free expert path (experts.py)
    _can_record_outputs = {
        "hidden_states": DeepseekMoEDecoderLayer,
        # one [batch, heads, queries, keys] map per decoder layer (MTP layers run outside the recording)
        "attentions": [OutputRecorder(MultiHeadAttention, index=1), OutputRecorder(MultiHeadLatentAttention, index=1)],
        "router_logits": OutputRecorder(TopKRouter, index=0),
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' initialisation plus this package's modules. Tensors that loading filled carry
        ``_is_hf_initialized`` and are left as they are (``transformers.initialization`` skips them too)."""
        std = self.config.initializer_range
        if isinstance(module, FP8Linear):  # random values, quantized (FP8 tensors have no normal_)
            if not getattr(module.weight, "_is_hf_initialized", False):
                module.set_weight(torch.randn(module.weight.shape, device=module.weight.device) * std)
            if module.bias is not None:
                init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.e_score_correction_bias is not None:
                init.zeros_(module.e_score_correction_bias)
            for name in module.LOAD_COUNTERS:
                init.zeros_(getattr(module, name))
        elif isinstance(module, ExpertChunk):
            for name in module.PARTS:
                weight = getattr(module, name)
                if not getattr(weight, "_is_hf_initialized", False):
                    module.set_weights(name, torch.randn(module.shapes[name], device=weight.device) * std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)

    # ------------------------------------------------------------------ checkpoints in DeepSeek's layout
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, **kwargs
    ) -> "DeepseekMoEPreTrainedModel":
        """Load a checkpoint in DeepSeek's official layout (per-expert tensors, sharded safetensors).

        transformers' contract: ``config``, ``state_dict`` (with ``None`` as the path), ``dtype`` (default
        ``"auto"``: the checkpoint's), ``device_map``, ``max_memory``, ``attn_implementation``,
        ``output_loading_info``, ``ignore_mismatched_sizes``, ``subfolder``, ``revision``, ``token`` and
        config overrides as keyword arguments. Every backbone tensor must come from the checkpoint: a
        missing, unexpected or misshapen one is a :class:`CheckpointError` naming it; task heads are
        initialised fresh (see :mod:`.loading`).
        """
        return load_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_size: int | str = "5GB",
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """Write the official layout (DeepSeek's tensor names, shapes and dtypes), a config naming this
        package's model_type with ``auto_map``, and the modeling code for ``trust_remote_code``. A model
        loaded in bitsandbytes 4-bit is refused (save its adapters; merge them into the float checkpoint)."""
        if getattr(self, "is_loaded_in_4bit", False):
            raise NotImplementedError(
                f"{type(self).__name__}.save_pretrained: this model was loaded in bitsandbytes 4-bit, which DeepSeek's "
                "layout cannot hold; save the LoRA adapters (peft_model.save_pretrained) and merge them into the "
                "float or FP8 checkpoint with `deepseek-moe-convert merge-lora`")
        save_official_checkpoint(self, save_directory, state_dict=state_dict, max_shard_size=max_shard_size)
        if push_to_hub:  # transformers' push_to_hub saves through this method into a temporary folder
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self.push_to_hub(repo_id, max_shard_size=max_shard_size, **kwargs)


@dataclass
class DeepseekMoEModelOutput(MoeModelOutputWithPast):
    """transformers' MoE model output plus, in training, each MoE layer's routing decision (``routings``:
    logits, scores, chosen experts and weights), from which the causal LM computes the balance losses."""

    routings: tuple[RouterOutput, ...] | None = None


class DeepseekMoEModel(DeepseekMoEPreTrainedModel):
    """Embeddings, decoder layers and the final norm; ``mtp`` holds V3's multi-token prediction modules."""

    def __init__(self, config: DeepseekMoEConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(DeepseekMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.mtp = nn.ModuleList(
            MultiTokenPredictionLayer(config, depth) for depth in range(config.num_nextn_predict_layers)
        )
        # Without the MTP loss nothing reaches the MTP modules' weights: frozen, so that DDP (without
        # find_unused_parameters) and gradient checkpointing see no trainable parameter without a gradient.
        # They still load, save and draft tokens (generate_with_mtp).
        if not config.mtp_loss_weight:
            self.mtp.requires_grad_(False)
        self.gradient_checkpointing = False
        self.post_init()
        attach_training_hooks(self)  # router load counting and V3 bias updates, outside the forward

    @accepts_both_cache_names
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> DeepseekMoEModelOutput:
        """``cache`` (``past_key_values`` before transformers 5.24: either name works) holds the attention
        cache; the output carries it under the installed release's name, and in training the MoE layers'
        routing decisions (``routings``, for the balance losses)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        routings = []
        for layer in self.layers:
            hidden_states, routing = layer(
                hidden_states,
                position_embeddings,
                causal_mask,
                cache,
                position_ids=position_ids,
                **kwargs,
            )
            if routing is not None:
                routings.append(routing)
        return DeepseekMoEModelOutput(
            last_hidden_state=self.norm(hidden_states), routings=tuple(routings) if self.training else None,
            **with_cache(cache),
        )

    def router_statistics(self) -> dict[str, dict]:
        """Per MoE layer: tokens per expert and MaxVio, of the last forward and the last optimizer step."""
        return router_statistics(self)



@dataclass
class DeepseekMoECausalLMOutput(MoeCausalLMOutputWithPast):
    """transformers' MoE causal-LM output plus ``mtp_loss`` (V3's weighted multi-token-prediction loss,
    already included in ``loss``)."""

    mtp_loss: torch.FloatTensor | None = None


class DeepseekMoEForCausalLM(DeepseekMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekMoEConfig) -> None:
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = linear_layer(config, config.hidden_size, config.vocab_size)
        self.post_init()
        attach_training_hooks(self)  # keeps the last balance loss for the logs

    base_model_class = DeepseekMoEModel

    @accepts_both_cache_names
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> DeepseekMoECausalLMOutput:
        """transformers' causal-LM contract; ``cache`` or (before 5.24) ``past_key_values`` holds the cache."""
        outputs: DeepseekMoEModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        aux_loss = model_balance_loss(outputs.routings, self.config, batch)
        loss = multi_token_loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if aux_loss is not None:
                loss = loss + aux_loss.to(loss.device)
            if self.config.mtp_loss_weight and len(self.model.mtp):
                if input_ids is None:
                    raise ValueError("the MTP loss (mtp_loss_weight > 0) needs `input_ids`")
                multi_token_loss = mtp_loss(
                    self, outputs.last_hidden_state, input_ids, labels, attention_mask, position_ids
                )
                loss = loss + multi_token_loss.to(loss.device)
        return DeepseekMoECausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            mtp_loss=multi_token_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            **with_cache(output_cache(outputs)),
        )

    def generate_with_mtp(
        self, input_ids: torch.Tensor, max_new_tokens: int = 32, eos_token_id: int | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Greedy decoding with V3's MTP module drafting one token per step (identical output to greedy
        ``generate``). Returns the sequence and ``{"acceptance_rate", "accepted", "drafted", "main_forwards"}``."""
        return speculative_generate(self, input_ids, max_new_tokens, eos_token_id)


def model_balance_loss(routings: tuple[RouterOutput, ...] | None, config, batch: int) -> torch.Tensor | None:
    """The balance losses of all MoE layers (None outside training or when the config enables none)."""
    losses = [loss for routing in routings or () if (loss := balance_loss(routing, config, batch)) is not None]
    if not losses:
        return None
    return sum(loss.to(losses[0].device) for loss in losses)


# ---------------------------------------------------------------------- the three families
class DeepseekMoEV1Model(DeepseekMoEModel):
    config_class = DeepseekMoEV1Config


class DeepseekMoEV1ForCausalLM(DeepseekMoEForCausalLM, GenerationMixin):
    config_class = DeepseekMoEV1Config
    base_model_class = DeepseekMoEV1Model


class DeepseekMoEV1ForSequenceClassification(GenericForSequenceClassification, DeepseekMoEPreTrainedModel):
    config_class = DeepseekMoEV1Config


class DeepseekMoEV2Model(DeepseekMoEModel):
    config_class = DeepseekMoEV2Config


class DeepseekMoEV2ForCausalLM(DeepseekMoEForCausalLM, GenerationMixin):
    config_class = DeepseekMoEV2Config
    base_model_class = DeepseekMoEV2Model


class DeepseekMoEV2ForSequenceClassification(GenericForSequenceClassification, DeepseekMoEPreTrainedModel):
    config_class = DeepseekMoEV2Config


class DeepseekMoEV3Model(DeepseekMoEModel):
    config_class = DeepseekMoEV3Config
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]


class DeepseekMoEV3ForCausalLM(DeepseekMoEForCausalLM, GenerationMixin):
    config_class = DeepseekMoEV3Config
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    base_model_class = DeepseekMoEV3Model


class DeepseekMoEV3ForSequenceClassification(GenericForSequenceClassification, DeepseekMoEPreTrainedModel):
    config_class = DeepseekMoEV3Config
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
