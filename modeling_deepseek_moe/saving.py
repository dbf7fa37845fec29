"""``save_pretrained``: the official layout (DeepSeek's tensor names, shapes and dtypes), sharded and
written through a temporary folder, with a config that carries ``auto_map`` and the modeling code for
``trust_remote_code``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging

from .layout import OfficialLayout, official_architecture
from .safetensors_io import write_weights

logger = logging.get_logger(__name__)


# The files of a tokenizer saved with save_pretrained (transformers' and sentencepiece / tiktoken ones).
TOKENIZER_FILES = re.compile(r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt"
                             r"|chat_template\.(jinja|json)|.*\.model|.*\.tiktoken")


def copy_tokenizer(source: str, staging: str, save_directory: str) -> list[str]:
    """The tokenizer of the folder the model was loaded from, copied to ``staging`` unless the destination
    already holds one (saved by ``tokenizer.save_pretrained``, which then stays as it is), so that the saved
    folder works with AutoTokenizer and pipelines. Returns the copied names (none for a Hub repository)."""
    if not os.path.isdir(source or "") or any(TOKENIZER_FILES.fullmatch(name) for name in os.listdir(save_directory)):
        return []
    names = [name for name in os.listdir(source) if TOKENIZER_FILES.fullmatch(name)]
    for name in names:
        shutil.copy(os.path.join(source, name), staging)
    if names:
        logger.info("copied the tokenizer of %s (%s) to %s", source, ", ".join(sorted(names)), save_directory)
    return names


def remote_code_files() -> list[str]:
    """This package's modeling file and every file it imports relatively (what trust_remote_code needs),
    each once."""
    modeling = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modeling.py")
    return list(dict.fromkeys([modeling, *get_relative_import_files(modeling)]))


def auto_map(config_class: type) -> dict[str, str]:
    """The ``auto_map`` of a folder saved with this package's code, for ``trust_remote_code``."""
    family = config_class.__name__.removeprefix("DeepseekMoE").removesuffix("Config")  # "V1", "V2", "V3"
    return {
        "AutoConfig": f"configuration.{config_class.__name__}",
        "AutoModel": f"modeling.DeepseekMoE{family}Model",
        "AutoModelForCausalLM": f"modeling.DeepseekMoE{family}ForCausalLM",
        "AutoModelForSequenceClassification": f"modeling.DeepseekMoE{family}ForSequenceClassification",
    }


def save_official_checkpoint(model, save_directory: str | os.PathLike, state_dict=None, max_shard_size="5GB") -> None:
    """Write ``model`` in the official layout with config, generation config and remote code."""
    save_directory = str(save_directory)
    if model.config.ep_size > 1:
        raise ValueError(f"this expert-parallel model (ep_size={model.config.ep_size}) holds 1/{model.config.ep_size} "
                         "of the routed experts; save the checkpoint from a model loaded with ep_size=1")
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file, not a folder")
    os.makedirs(save_directory, exist_ok=True)
    if state_dict is None:
        state_dict = model.state_dict()
    prefix = "" if hasattr(model, model.base_model_prefix) else model.base_model_prefix + "."
    state_dict = {prefix + name: tensor for name, tensor in state_dict.items()}
    if model.config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    tensors = OfficialLayout(model.config).official_state(state_dict)

    staging = tempfile.mkdtemp(prefix=".saving-", dir=save_directory)
    try:
        written = write_weights(staging, tensors, max_shard_size)
        config = model.config
        config.architectures = [official_architecture(type(model).__name__)]  # engines read DeepSeek's name
        config.auto_map = auto_map(type(config))
        config.dtype = model.dtype
        config.save_pretrained(staging)
        written.append("config.json")
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
            written.append("generation_config.json")
        for source in remote_code_files():
            shutil.copy(source, staging)
            written.append(os.path.basename(source))
        written += copy_tokenizer(model.name_or_path, staging, save_directory)
        for stale in os.listdir(save_directory):  # weights of an earlier save that this one does not replace
            if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale) and stale not in written:
                os.remove(os.path.join(save_directory, stale))
        for name in written:
            os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
