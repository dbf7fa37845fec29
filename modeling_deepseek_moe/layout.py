"""DeepSeek's official on-disk layout: tensor names and shapes, and where each lives in this package's modules.

On disk (what DeepSeek releases and what serving engines read): one tensor per routed expert
(``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight``), V3's multi-token-prediction module as layer
``num_hidden_layers`` (with its own copies of the embedding and output head). In memory: experts stacked per
chunk (``...mlp.experts.chunks.C.gate_up_proj`` ``[experts, 2 * moe_intermediate, hidden]`` = gate rows then
up rows), the MTP module under ``model.mtp.D``. :class:`OfficialLayout` is the bijection between the two;
:func:`official_tensor_shapes` is the one list of every tensor a config implies (loading, conversion,
placement and the synthetic checkpoints all read it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .configuration import is_moe_layer

# DeepSeek's own model_type for each of this package's families: config.json in either schema loads.
OFFICIAL_MODEL_TYPES = {"deepseek_moe_v1": "deepseek", "deepseek_moe_v2": "deepseek_v2", "deepseek_moe_v3": "deepseek_v3"}
_FAMILY_CLASS = re.compile(r"^DeepseekMoEV(?P<version>[123])(?P<head>\w*)$")


def official_architecture(class_name: str) -> str:
    """DeepSeek's name for one of this package's model classes (``DeepseekMoEV3ForCausalLM`` ->
    ``DeepseekV3ForCausalLM``, ``DeepseekMoEV1ForCausalLM`` -> ``DeepseekForCausalLM``): what config.json's
    ``architectures`` says, which serving engines (llama.cpp's converter, vLLM, SGLang) dispatch on."""
    match = _FAMILY_CLASS.match(class_name)
    if match is None:
        raise ValueError(f"{class_name!r} is not a DeepseekMoEV1/V2/V3 model class")
    version = "" if match["version"] == "1" else f"V{match['version']}"
    return f"Deepseek{version}{match['head']}"

EXPERT_KEY = re.compile(
    r"^(?P<prefix>model\.(?:layers|mtp)\.\d+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.(?P<kind>weight|weight_scale_inv)$"
)
CHUNK_PARAM = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.chunks\.(?P<chunk>\d+)\.(?P<param>gate_up_proj|down_proj)(?P<scale>_scale_inv)?$"
)
LAYER_KEY = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<rest>.+)$")
MTP_PARAM = re.compile(r"^model\.mtp\.(?P<depth>\d+)\.(?P<rest>.+)$")
# Tensors of the official MTP layer that are copies of the main model's embedding and output head.
MTP_SHARED_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


@dataclass(frozen=True)
class Slot:
    """Where an official tensor lives in memory: ``param[index][rows]`` (index/rows None = whole)."""

    param: str
    index: int | None = None
    rows: slice | None = None


class OfficialLayout:
    """The bijection between this package's parameter names and DeepSeek's tensor keys for one config."""

    def __init__(self, config) -> None:
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.mtp_depth = config.num_nextn_predict_layers
        if config.n_routed_experts:
            self.experts_per_chunk = config.n_routed_experts // config.num_expert_chunks
        self.intermediate = config.moe_intermediate_size
        quantization = getattr(config, "quantization_config", None) or {}
        block_rows = (quantization if isinstance(quantization, dict) else {}).get("weight_block_size", [128])[0]
        # Where a stacked gate_up tensor's up part starts: row I of the weight, row ceil(I/128) of its scales.
        self.gate_up_split = {False: self.intermediate, True: -(-self.intermediate // block_rows) if self.intermediate else None}

    def slot(self, key: str) -> Slot | None:
        """The in-memory slot of official ``key``; None for tensors this model does not hold (the MTP
        layers beyond ``num_nextn_predict_layers`` and the MTP's copies of embedding and head)."""
        layer = LAYER_KEY.match(key)
        if layer and int(layer["layer"]) >= self.num_layers:
            depth = int(layer["layer"]) - self.num_layers
            if depth >= self.mtp_depth or layer["rest"] in MTP_SHARED_COPIES:
                return None
            key = f"model.mtp.{depth}.{layer['rest']}"
        expert = EXPERT_KEY.match(key)
        if expert is None:
            return Slot(key)
        chunk, index = divmod(int(expert["expert"]), self.experts_per_chunk)
        proj, scale = expert["proj"], expert["kind"] == "weight_scale_inv"
        param = f"{expert['prefix']}.chunks.{chunk}.{'down_proj' if proj == 'down' else 'gate_up_proj'}" + ("_scale_inv" if scale else "")
        split = self.gate_up_split[scale]
        rows = {"gate": slice(0, split), "up": slice(split, None), "down": None}[proj]
        return Slot(param, index, rows)

    def official_items(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Official ``(key, tensor view)`` pairs of one in-memory tensor, in DeepSeek's order."""
        mtp = MTP_PARAM.match(name)
        if mtp:
            name = f"model.layers.{self.num_layers + int(mtp['depth'])}.{mtp['rest']}"
        chunk = CHUNK_PARAM.match(name)
        if chunk is None:
            yield name, tensor
            return
        first = int(chunk["chunk"]) * self.experts_per_chunk
        kind = "weight_scale_inv" if chunk["scale"] else "weight"
        split = self.gate_up_split[bool(chunk["scale"])]
        for index in range(tensor.shape[0]):
            prefix = f"{chunk['prefix']}.{first + index}"
            if chunk["param"] == "down_proj":
                yield f"{prefix}.down_proj.{kind}", tensor[index]
            else:
                yield f"{prefix}.gate_proj.{kind}", tensor[index, :split]
                yield f"{prefix}.up_proj.{kind}", tensor[index, split:]

    def official_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole official state (views, no copies) of an in-memory state dict with ``model.`` names."""
        official = {}
        for name, tensor in state.items():
            official.update(self.official_items(name, tensor))
        for depth in range(self.mtp_depth):
            for copy, source in MTP_SHARED_COPIES.items():
                if source in state:
                    official[f"model.layers.{self.num_layers + depth}.{copy}"] = state[source]
        return official


def official_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official checkpoint of ``config`` (a config.json dict in DeepSeek's schema or
    ours), in DeepSeek's order; FP8 scales excluded."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    layers = config["num_hidden_layers"]
    mtp_layers = config.get("num_nextn_predict_layers", 0)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers + mtp_layers):
        prefix = f"model.layers.{layer}."
        if layer >= layers:  # V3 multi-token prediction module
            shapes.update({
                prefix + "embed_tokens.weight": (vocab, hidden),
                prefix + "enorm.weight": (hidden,),
                prefix + "hnorm.weight": (hidden,),
                prefix + "eh_proj.weight": (hidden, 2 * hidden),
                prefix + "shared_head.norm.weight": (hidden,),
                prefix + "shared_head.head.weight": (vocab, hidden),
            })
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
        shapes.update(_attention_shapes(config, prefix + "self_attn.", hidden, heads))
        shapes.update(_mlp_shapes(config, prefix + "mlp.", layer, hidden))
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _attention_shapes(config, prefix, hidden, heads):
    if OFFICIAL_MODEL_TYPES.get(config["model_type"], config["model_type"]) == "deepseek":
        head_dim = hidden // heads
        kv = config.get("num_key_value_heads") or heads
        return {
            prefix + "q_proj.weight": (heads * head_dim, hidden),
            prefix + "k_proj.weight": (kv * head_dim, hidden),
            prefix + "v_proj.weight": (kv * head_dim, hidden),
            prefix + "o_proj.weight": (hidden, heads * head_dim),
        }
    qk_head = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    kv_rank = config["kv_lora_rank"]
    shapes = {}
    if config.get("q_lora_rank"):
        q_rank = config["q_lora_rank"]
        shapes[prefix + "q_a_proj.weight"] = (q_rank, hidden)
        shapes[prefix + "q_a_layernorm.weight"] = (q_rank,)
        shapes[prefix + "q_b_proj.weight"] = (heads * qk_head, q_rank)
    else:
        shapes[prefix + "q_proj.weight"] = (heads * qk_head, hidden)
    shapes[prefix + "kv_a_proj_with_mqa.weight"] = (kv_rank + config["qk_rope_head_dim"], hidden)
    shapes[prefix + "kv_a_layernorm.weight"] = (kv_rank,)
    shapes[prefix + "kv_b_proj.weight"] = (heads * (config["qk_nope_head_dim"] + config["v_head_dim"]), kv_rank)
    shapes[prefix + "o_proj.weight"] = (hidden, heads * config["v_head_dim"])
    return shapes


def _mlp_shapes(config, prefix, layer, hidden):
    experts = config.get("n_routed_experts")
    if not is_moe_layer(layer, experts, config["first_k_dense_replace"], config.get("moe_layer_freq", 1)):
        width = config["intermediate_size"]
        return {
            prefix + "gate_proj.weight": (width, hidden),
            prefix + "up_proj.weight": (width, hidden),
            prefix + "down_proj.weight": (hidden, width),
        }
    width = config["moe_intermediate_size"]
    shapes = {prefix + "gate.weight": (experts, hidden)}
    if config.get("topk_method") == "noaux_tc":
        shapes[prefix + "gate.e_score_correction_bias"] = (experts,)
    for expert in range(experts):
        shapes[f"{prefix}experts.{expert}.gate_proj.weight"] = (width, hidden)
        shapes[f"{prefix}experts.{expert}.up_proj.weight"] = (width, hidden)
        shapes[f"{prefix}experts.{expert}.down_proj.weight"] = (hidden, width)
    if config.get("n_shared_experts"):
        shared = width * config["n_shared_experts"]
        shapes[prefix + "shared_experts.gate_proj.weight"] = (shared, hidden)
        shapes[prefix + "shared_experts.up_proj.weight"] = (shared, hidden)
        shapes[prefix + "shared_experts.down_proj.weight"] = (hidden, shared)
    return shapes
