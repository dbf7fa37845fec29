"""DeepSeek MoE family (DeepSeekMoE V1, DeepSeek-V2, DeepSeek-V3) for Hugging Face Transformers.

Importing the package registers the three families with AutoConfig, AutoModel and AutoModelForCausalLM
(and DeepSeek's own ``deepseek`` model_type of deepseek-moe-16b, which transformers does not know).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .safetensors_io import CheckpointError
from .configuration import DeepseekMoEConfig, DeepseekMoEV1Config, DeepseekMoEV2Config, DeepseekMoEV3Config
from .modeling import (
    DeepseekMoEForCausalLM,
    DeepseekMoEModel,
    DeepseekMoEPreTrainedModel,
    DeepseekMoEV1ForCausalLM,
    DeepseekMoEV1ForSequenceClassification,
    DeepseekMoEV1Model,
    DeepseekMoEV2ForCausalLM,
    DeepseekMoEV2ForSequenceClassification,
    DeepseekMoEV2Model,
    DeepseekMoEV3ForCausalLM,
    DeepseekMoEV3ForSequenceClassification,
    DeepseekMoEV3Model,
)

_FAMILIES = (
    (DeepseekMoEV1Config, DeepseekMoEV1Model, DeepseekMoEV1ForCausalLM, DeepseekMoEV1ForSequenceClassification),
    (DeepseekMoEV2Config, DeepseekMoEV2Model, DeepseekMoEV2ForCausalLM, DeepseekMoEV2ForSequenceClassification),
    (DeepseekMoEV3Config, DeepseekMoEV3Model, DeepseekMoEV3ForCausalLM, DeepseekMoEV3ForSequenceClassification),
)


def _register() -> None:
    for config, model, causal_lm, classifier in _FAMILIES:
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, model, exist_ok=True)
        AutoModelForCausalLM.register(config, causal_lm, exist_ok=True)
        AutoModelForSequenceClassification.register(config, classifier, exist_ok=True)
    # deepseek-moe-16b's config.json says model_type "deepseek": read it with our V1 config.
    if "deepseek" not in CONFIG_MAPPING:
        CONFIG_MAPPING.register("deepseek", DeepseekMoEV1Config, exist_ok=True)


_register()

__all__ = [
    "CheckpointError",
    "DeepseekMoEConfig",
    "DeepseekMoEV1Config",
    "DeepseekMoEV2Config",
    "DeepseekMoEV3Config",
    "DeepseekMoEPreTrainedModel",
    "DeepseekMoEModel",
    "DeepseekMoEForCausalLM",
    "DeepseekMoEV1Model",
    "DeepseekMoEV1ForCausalLM",
    "DeepseekMoEV1ForSequenceClassification",
    "DeepseekMoEV2Model",
    "DeepseekMoEV2ForCausalLM",
    "DeepseekMoEV2ForSequenceClassification",
    "DeepseekMoEV3Model",
    "DeepseekMoEV3ForCausalLM",
    "DeepseekMoEV3ForSequenceClassification",
]
