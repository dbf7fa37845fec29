"""LoRA for routed experts, registered with PEFT as a custom LoRA layer.

PEFT's ``target_parameters`` (``ParamWrapper``) adds ``W + BA`` for every expert on every forward: on a
64-expert model a LoRA step then takes ~2x the memory of LoRA on attention alone (measured,
``benchmarks/bench_lora_memory.py``). :class:`ExpertChunkLora` instead keeps per-expert rank-r factors
and applies them inside the grouped products (``B_e (A_e x)``), so it costs two thin grouped GEMMs per
projection and no full-size delta.

    from modeling_deepseek_moe.lora import lora_config
    model = peft.get_peft_model(model, lora_config(r=8, targets=("attention", "shared", "experts")))
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn
from torch.utils.checkpoint import checkpoint

from .experts import ExpertChunk, expert_range
from .grouped_mm import grouped_linear
from .fp8 import FP8Linear

# Adapters take the base weight's dtype when it is one they can train in (else float32).
TRAINABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Module-name patterns of each LoRA target family (regex alternatives for LoraConfig.target_modules).
TARGETS = {
    "attention": r"self_attn\.(q_proj|k_proj|v_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)",
    "dense": r"layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
    "shared": r"shared_experts\.(gate_proj|up_proj|down_proj)",
    "experts": r"experts\.chunks\.\d+",
}


def lora_config(targets: Iterable[str] = ("attention", "dense", "shared", "experts"), **kwargs) -> LoraConfig:
    """A ``LoraConfig`` targeting the named families (see ``TARGETS``), with :class:`ExpertChunkLora`
    registered for the routed experts. ``kwargs`` go to ``LoraConfig`` (``r``, ``lora_alpha``, ...)."""
    pattern = "|".join(TARGETS[name] for name in targets)
    return register_layers(LoraConfig(target_modules=rf".*\.({pattern})$", **kwargs))


def register_layers(config: LoraConfig) -> LoraConfig:
    """Register this package's LoRA layers with ``config``: :class:`ExpertChunkLora` for routed experts and
    :class:`FP8LoraLinear` for FP8 projections."""
    config._register_custom_module({ExpertChunk: ExpertChunkLora, FP8Linear: FP8LoraLinear})
    return config


def load_adapter(model: nn.Module, adapter_directory: str, **kwargs) -> PeftModel:
    """``PeftModel.from_pretrained`` with this package's LoRA layers registered (PEFT does not save them)."""
    config = register_layers(LoraConfig.from_pretrained(adapter_directory))
    return PeftModel.from_pretrained(model, adapter_directory, config=config, **kwargs)


class FP8LoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` on a frozen :class:`FP8Linear`: the adapters stay float32 (PEFT would cast
    them to the base weight's dtype, FP8), and merging dequantizes, adds and re-quantizes the base."""

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        device = device or self.get_base_layer().weight.device
        for name in self.adapter_layer_names:
            layer = getattr(self, name, None)
            if isinstance(layer, nn.ModuleDict) and adapter_name in layer:
                layer[adapter_name] = layer[adapter_name].to(device)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.lora_A:
                self.get_base_layer().merge_delta(self.get_delta_weight(adapter), safe=safe_merge)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                self.get_base_layer().merge_delta(-self.get_delta_weight(adapter))


def rank_projection(a: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
    """``A_e x`` for each row x of expert e: ``rows`` ``[n, in]`` (after ``dropout``, in A's dtype) through the
    stacked LoRA factors ``a`` ``[experts, r, in]`` -> ``[n, r]``."""
    return grouped_linear(a, dropout(rows).to(a.dtype), offsets)


class ExpertChunkLora(nn.Module, LoraLayer):
    """Per-expert LoRA on a chunk's ``gate_up_proj`` and ``down_proj``:
    ``A [experts, r, in]`` (random) and ``B [experts, out, r]`` (zero) for each."""

    adapter_layer_names = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")
    PROJECTIONS = ("gate_up_proj", "down_proj")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 8,
                 lora_alpha: int = 8, **kwargs) -> None:
        nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.shapes["gate_up_proj"][-1], module.shapes["gate_up_proj"][-1]

    def factors(self, projection: str) -> tuple[nn.ParameterDict, nn.ParameterDict]:
        prefix = "lora_gate_up" if projection == "gate_up_proj" else "lora_down"
        return getattr(self, prefix + "_A"), getattr(self, prefix + "_B")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {r}")
        base = self.get_base_layer()
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        for projection in self.PROJECTIONS:
            weight = getattr(base, projection)  # [experts, out, in], or its compressed form
            experts, out_features, in_features = base.shapes[projection]
            factor_a, factor_b = self.factors(projection)
            dtype = weight.dtype if weight.dtype in TRAINABLE_DTYPES else torch.float32
            a = torch.empty(experts, r, in_features, device=weight.device, dtype=dtype)
            nn.init.kaiming_uniform_(a.view(-1, in_features), a=math.sqrt(5))  # as PEFT initialises lora_A
            factor_a[adapter_name] = nn.Parameter(a)
            factor_b[adapter_name] = nn.Parameter(torch.zeros(experts, out_features, r, device=weight.device, dtype=dtype))
        self.set_adapter(self.active_adapters)

    def delta(self, projection: str, rows: torch.Tensor, offsets: torch.Tensor,
              experts: slice = slice(None)) -> torch.Tensor | None:
        """Sum over active adapters of ``scaling * B_e (A_e x)`` for each row x of expert e (of the range
        ``experts``), ``[n, out]``."""
        total = None
        factor_a, factor_b = self.factors(projection)
        for adapter in self.active_adapters:
            if adapter not in factor_a:
                continue
            a, b = expert_range(factor_a[adapter], experts), expert_range(factor_b[adapter], experts)
            dropout = self.lora_dropout[adapter]
            if torch.is_grad_enabled() and rows.element_size() < a.element_size() and (rows.requires_grad or a.requires_grad):
                # Rows in a lower precision than the adapters (bf16 rows, float32 adapters as PEFT makes them):
                # autograd keeps the rows as they are and casts them again in the backward, not a float32 copy
                # (41 KB less per token and MoE layer at V2-Lite's widths; the rank-r product is recomputed).
                low_rank = checkpoint(rank_projection, a, rows, offsets, dropout, use_reentrant=False)
            else:
                low_rank = rank_projection(a, rows, offsets, dropout)
            term = grouped_linear(b, low_rank * self.scaling[adapter], offsets)  # scaled at rank r: no [n, out] copy
            total = term if total is None else total + term
        return total

    def forward(self, rows: torch.Tensor, offsets: torch.Tensor, row_weights: torch.Tensor,
                experts: slice = slice(None)) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(rows, offsets, row_weights, experts)
        return self.base_layer(rows, offsets, row_weights, experts, delta=self.delta)

    def get_delta_weight(self, adapter: str) -> dict[str, torch.Tensor]:
        """``{projection: scaling * B @ A}``, ``[experts, out, in]`` each (used to merge)."""
        deltas = {}
        for projection in self.PROJECTIONS:
            factor_a, factor_b = self.factors(projection)
            deltas[projection] = torch.bmm(factor_b[adapter].float(), factor_a[adapter].float()) * self.scaling[adapter]
        return deltas

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        for adapter in adapter_names or self.active_adapters:
            if adapter not in self.lora_gate_up_A:
                continue
            for projection, delta in self.get_delta_weight(adapter).items():
                base.merge_delta(projection, delta, safe=safe_merge)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            for projection, delta in self.get_delta_weight(adapter).items():
                base.merge_delta(projection, -delta)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
