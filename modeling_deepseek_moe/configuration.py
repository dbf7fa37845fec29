"""Configurations of the DeepSeek MoE family: DeepSeekMoE (V1), DeepSeek-V2 and DeepSeek-V3.

Each class accepts every field of DeepSeek's released ``config.json`` for its family (``rope_theta`` and
``rope_scaling`` are folded into transformers' ``rope_parameters``) and defaults to the released model:
deepseek-moe-16b, DeepSeek-V2 (236B) and DeepSeek-V3 (671B). Contradictory values raise ``ValueError`` at
construction, naming the field and the values.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PreTrainedConfig

from .fp8 import FP8_COMPUTE_MODES, SCALE_FORMATS

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


def is_moe_layer(layer: int, n_routed_experts: int | None, first_k_dense_replace: int, moe_layer_freq: int) -> bool:
    """DeepSeek's rule: layer i is MoE iff there are routed experts, i >= first_k_dense_replace and
    i % moe_layer_freq == 0 (the config classes and the checkpoint layout both ask it)."""
    return bool(n_routed_experts) and layer >= first_k_dense_replace and layer % moe_layer_freq == 0
SCORING_FUNCS = ("softmax", "sigmoid")
# DeepSeek-V2's released configuration class defaults to this misspelling of "greedy".
TOPK_METHOD_ALIASES = {"gready": "greedy"}


class DeepseekMoEConfig(PreTrainedConfig):
    """Fields shared by the three families; the subclasses only change defaults and what is allowed.

    Fields that DeepSeek's configs do not carry:
        num_expert_chunks: routed experts of a layer are stored as this many contiguous chunks (tensors
            ``[experts_per_chunk, ...]``), so that a ``device_map`` can place a layer's experts apart.
            With ``ep_size`` > 1 (expert parallelism over that many ranks) it is ``ep_size``: one per rank.
        device_aux_loss_alpha: V2 paper's device-level balance loss coefficient (a2 = 0.05 there; 0 = off).
            The ``n_group`` expert groups are the devices.
        comm_aux_loss_alpha: V2 paper's communication balance loss coefficient (a3 = 0.02 there; 0 = off),
            with ``topk_group`` devices per token (M).
        bias_update_speed: V3's auxiliary-loss-free balancing step gamma (0 freezes the correction bias).
        capacity_factor: V2-style token dropping in training (None = off): each expert keeps at most
            ``ceil(capacity_factor * T * K / E)`` assignments, those with the highest affinity.
        mla_absorb: MLA attention in the latent space, ``kv_b_proj`` absorbed into the query and output
            (DeepSeek's ``attn_impl="absorb"``): "decode" (default: for steps of at most
            ``MLA_ABSORB_MAX_QUERY`` new tokens over a cache, in inference), "always" or "never".
        mtp_loss_weight: V3's multi-token-prediction loss weight lambda (0.3 early in the paper, then 0.1);
            0 leaves the MTP modules out of training: their parameters are built frozen (they still load,
            save and draft tokens), so no trainable parameter goes without a gradient (DDP).
        fp8_compute: with an FP8 ``quantization_config``, how quantized weights multiply: "auto" (FP8
            GEMMs with activations quantized per 1 x 128 group for projections where the GPU has them,
            compute capability >= 8.9; "dequantize" for the rest), "dequantize" (each weight dequantized
            for the product that uses it, memory stays FP8) or "scaled" (always FP8 activations; emulated
            where there is no FP8 kernel, e.g. on CPUs and for routed experts).
    """

    # Which attention the family uses ("mha": Llama-style, "mla": Multi-head Latent Attention).
    attention_type: ClassVar[str] = "mla"
    # DeepSeekMoE (V1) computes gate logits in the model dtype; V2 and V3 in float32.
    router_logits_in_fp32: ClassVar[bool] = True
    # DeepSeekMoE (V1) has no `routed_scaling_factor`; V2 applies it to unnormalised weights, V3 always.
    uses_routed_scaling: ClassVar[bool] = True
    allowed_topk_methods: ClassVar[tuple[str, ...]] = TOPK_METHODS
    allowed_scoring_funcs: ClassVar[tuple[str, ...]] = SCORING_FUNCS
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    vocab_size: int = 102400
    hidden_size: int = 5120
    intermediate_size: int = 12288
    moe_intermediate_size: int = 1536
    num_hidden_layers: int = 60
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 160
    ep_size: int = 1
    routed_scaling_factor: float = 16.0
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "group_limited_greedy"
    n_group: int | None = 8
    topk_group: int | None = 3
    num_experts_per_tok: int | None = 6
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    num_nextn_predict_layers: int = 0
    quantization_config: dict | None = None
    output_router_logits: bool = False
    num_expert_chunks: int = 1
    device_aux_loss_alpha: float = 0.0
    comm_aux_loss_alpha: float = 0.0
    bias_update_speed: float = 0.001
    capacity_factor: float | None = None
    mla_absorb: str = "decode"
    mtp_loss_weight: float = 0.0
    fp8_compute: str = "auto"

    def __post_init__(self, **kwargs: Any) -> None:
        self.topk_method = TOPK_METHOD_ALIASES.get(self.topk_method, self.topk_method)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_type == "mla":
            self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
            # transformers' RoPE initialisers read `head_dim`: MLA rotates only the rope part.
            self.head_dim = self.qk_rope_head_dim
        else:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        self.validate_architecture()

    # ------------------------------------------------------------------ validation
    def validate_architecture(self) -> None:
        """Raise ``ValueError`` on contradictory values, naming the field and the values."""

        def fail(message: str) -> None:
            raise ValueError(f"{type(self).__name__}: {message}")

        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        if self.attention_type == "mla":
            positive += ["kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                fail(f"`{name}` must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            fail(f"`q_lora_rank` must be a positive integer or null, got {self.q_lora_rank!r}")
        if self.mla_absorb not in ("decode", "always", "never"):
            fail(f"`mla_absorb` must be 'decode', 'always' or 'never', got {self.mla_absorb!r}")
        self._validate_quantization(fail)
        if self.qk_rope_head_dim % 2:
            fail(f"`qk_rope_head_dim` must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.attention_type == "mha":
            if self.hidden_size % self.num_attention_heads:
                fail(
                    f"`hidden_size` ({self.hidden_size}) must be divisible by "
                    f"`num_attention_heads` ({self.num_attention_heads})"
                )
            if self.num_attention_heads % self.num_key_value_heads:
                fail(
                    f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by "
                    f"`num_key_value_heads` ({self.num_key_value_heads})"
                )
        if self.n_routed_experts is None:
            return
        self._validate_routing(fail)

    def _validate_quantization(self, fail) -> None:
        if self.fp8_compute not in FP8_COMPUTE_MODES:
            fail(f"`fp8_compute` must be one of {list(FP8_COMPUTE_MODES)}, got {self.fp8_compute!r}")
        quantization = self.quantization_config
        if not quantization:
            return
        if not isinstance(quantization, dict):
            quantization = self.quantization_config = quantization.to_dict()
        if quantization.get("quant_method") == "bitsandbytes":
            if not quantization.get("load_in_4bit"):
                fail("`quantization_config` of bitsandbytes must load in 4 bits (load_in_4bit=True): the routed "
                     f"experts have no 8-bit form here, got load_in_8bit={quantization.get('load_in_8bit')!r}")
            return
        expected = {"quant_method": ("fp8",), "fmt": ("e4m3",), "activation_scheme": ("dynamic",),
                    "scale_fmt": (None, *SCALE_FORMATS)}
        for name, allowed in expected.items():
            if quantization.get(name, allowed[0]) not in allowed:
                fail(f"`quantization_config.{name}` must be one of {list(allowed)} (DeepSeek's block-wise FP8), "
                     f"got {quantization.get(name)!r}")
        block = quantization.get("weight_block_size", [128, 128])
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            fail(f"`quantization_config.weight_block_size` must be two positive integers, got {block!r}")

    def _validate_routing(self, fail) -> None:
        experts, top_k = self.n_routed_experts, self.num_experts_per_tok
        if self.topk_method not in self.allowed_topk_methods:
            fail(f"`topk_method` must be one of {list(self.allowed_topk_methods)}, got {self.topk_method!r}")
        if self.scoring_func not in self.allowed_scoring_funcs:
            fail(f"`scoring_func` must be one of {list(self.allowed_scoring_funcs)}, got {self.scoring_func!r}")
        if not isinstance(experts, int) or experts <= 0:
            fail(f"`n_routed_experts` must be a positive integer or null, got {experts!r}")
        if not isinstance(top_k, int) or not 0 < top_k <= experts:
            fail(f"`num_experts_per_tok` must be in [1, n_routed_experts={experts}], got {top_k!r}")
        if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
            fail(f"`moe_intermediate_size` must be a positive integer, got {self.moe_intermediate_size!r}")
        if self.moe_layer_freq < 1:
            fail(f"`moe_layer_freq` must be >= 1, got {self.moe_layer_freq}")
        if self.first_k_dense_replace < 0:
            fail(f"`first_k_dense_replace` must be >= 0, got {self.first_k_dense_replace}")
        if self.num_expert_chunks < 1 or experts % self.num_expert_chunks:
            fail(
                f"`num_expert_chunks` ({self.num_expert_chunks}) must divide "
                f"`n_routed_experts` ({experts})"
            )
        if self.ep_size < 1 or experts % self.ep_size:
            fail(f"`ep_size` ({self.ep_size}) must divide `n_routed_experts` ({experts})")
        if self.ep_size > 1:  # expert parallelism: one chunk of experts per rank
            if self.num_expert_chunks not in (1, self.ep_size):
                fail(f"`num_expert_chunks` ({self.num_expert_chunks}) must equal `ep_size` ({self.ep_size}): one chunk per rank")
            self.num_expert_chunks = self.ep_size
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            fail(f"`capacity_factor` must be positive or null, got {self.capacity_factor}")
        if self.bias_update_speed < 0:
            fail(f"`bias_update_speed` must be >= 0, got {self.bias_update_speed}")
        device_losses = {"device_aux_loss_alpha": self.device_aux_loss_alpha, "comm_aux_loss_alpha": self.comm_aux_loss_alpha}
        for name, value in device_losses.items():
            if value and self.topk_method == "noaux_tc":
                fail(f"`{name}` ({value}) is a DeepSeek-V2 loss; V3 balances with `bias_update_speed` instead")
            if value and (not self.n_group or experts % self.n_group):
                fail(f"`{name}` ({value}) needs `n_group` device groups dividing the experts, got n_group={self.n_group}")
        if self.comm_aux_loss_alpha and not self.topk_group:
            fail(f"`comm_aux_loss_alpha` ({self.comm_aux_loss_alpha}) needs `topk_group` (devices per token)")
        if self.topk_method == "greedy":
            return
        n_group, topk_group = self.n_group, self.topk_group
        if not isinstance(n_group, int) or n_group <= 0:
            fail(f"`topk_method={self.topk_method!r}` needs a positive `n_group`, got {n_group!r}")
        if experts % n_group:
            fail(f"`n_routed_experts` ({experts}) must be divisible by `n_group` ({n_group})")
        if not isinstance(topk_group, int) or not 0 < topk_group <= n_group:
            fail(f"`topk_group` must be in [1, n_group={n_group}], got {topk_group!r}")
        reachable = topk_group * (experts // n_group)
        if top_k > reachable:
            fail(
                f"`num_experts_per_tok` ({top_k}) exceeds the experts in `topk_group` groups "
                f"({topk_group} groups x {experts // n_group} experts = {reachable})"
            )
        if self.topk_method == "noaux_tc" and experts // n_group < 2:
            fail(
                "`topk_method='noaux_tc'` scores a group by its two best experts: needs at least 2 experts "
                f"per group, got n_routed_experts={experts}, n_group={n_group}"
            )

    # ------------------------------------------------------------------ structure
    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` is an MoE layer (:func:`is_moe_layer`)."""
        return is_moe_layer(layer_idx, self.n_routed_experts, self.first_k_dense_replace, self.moe_layer_freq)


class DeepseekMoEV1Config(DeepseekMoEConfig):
    """DeepSeekMoE (deepseek-moe-16b): Llama multi-head attention, softmax greedy top-k routing."""

    model_type = "deepseek_moe_v1"
    attention_type: ClassVar[str] = "mha"
    router_logits_in_fp32: ClassVar[bool] = False
    uses_routed_scaling: ClassVar[bool] = False
    allowed_topk_methods: ClassVar[tuple[str, ...]] = ("greedy",)
    allowed_scoring_funcs: ClassVar[tuple[str, ...]] = ("softmax",)

    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = 6
    first_k_dense_replace: int = 1
    max_position_embeddings: int = 4096


class DeepseekMoEV2Config(DeepseekMoEConfig):
    """DeepSeek-V2 / V2-Lite: MLA, softmax routing, greedy or group-limited greedy (device-limited) top-k."""

    model_type = "deepseek_moe_v2"
    allowed_topk_methods: ClassVar[tuple[str, ...]] = ("greedy", "group_limited_greedy")
    allowed_scoring_funcs: ClassVar[tuple[str, ...]] = ("softmax",)

    def __post_init__(self, **kwargs: Any) -> None:
        if self.rope_parameters is None and "rope_scaling" not in kwargs:
            kwargs["rope_scaling"] = _released_yarn(mscale=0.707)
        super().__post_init__(**kwargs)


class DeepseekMoEV3Config(DeepseekMoEConfig):
    """DeepSeek-V3: MLA, sigmoid scores with `noaux_tc` group routing and `e_score_correction_bias`."""

    model_type = "deepseek_moe_v3"
    allowed_topk_methods: ClassVar[tuple[str, ...]] = ("noaux_tc",)

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 256
    routed_scaling_factor: float = 2.5
    topk_method: str = "noaux_tc"
    n_group: int | None = 8
    topk_group: int | None = 4
    num_experts_per_tok: int | None = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    # The V3 paper's complementary sequence-wise loss weight (released config.json files say 0.001).
    aux_loss_alpha: float = 0.0001
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    num_nextn_predict_layers: int = 1

    def __post_init__(self, **kwargs: Any) -> None:
        if self.rope_parameters is None and "rope_scaling" not in kwargs:
            kwargs["rope_scaling"] = _released_yarn(mscale=1.0)
        super().__post_init__(**kwargs)


def _released_yarn(mscale: float) -> dict[str, Any]:
    """The YaRN settings of the released V2 and V3 configs."""
    return {
        "type": "yarn",
        "factor": 40,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": mscale,
        "mscale_all_dim": mscale,
        "original_max_position_embeddings": 4096,
    }
