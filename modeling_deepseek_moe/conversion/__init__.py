"""Checkpoint conversion as library functions, one per ``deepseek-moe-convert`` subcommand:

    from modeling_deepseek_moe import conversion
    conversion.dequantize("DeepSeek-V3", "DeepSeek-V3-bf16")

Each validates its input before writing anything (a :class:`CheckpointError` naming the file, tensor or
config field), streams shard by shard into ``DST.partial`` and renames it to ``DST`` when done
(``resume=True`` continues an interrupted run). The engine is :mod:`.engine`; each family of subcommands
has its module; the command line is the top-level ``deepseek_moe_convert`` module.
"""

from .configs import from_official, to_official, to_official_config, to_our_config
from .engine import Summary
from .lora_merge import merge_lora, read_lora_adapter
from .model_parallel import from_mp, mp_file, to_mp
from .quantization import dequantize, quantize
from .verification import verify

__all__ = [
    "Summary",
    "dequantize",
    "from_mp",
    "from_official",
    "merge_lora",
    "mp_file",
    "quantize",
    "read_lora_adapter",
    "to_mp",
    "to_official",
    "to_official_config",
    "to_our_config",
    "verify",
]
