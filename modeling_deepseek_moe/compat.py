"""The one module that knows how the transformers releases of the declared range differ.

pyproject.toml declares the range the test suite proves. Within it, transformers 5.24 renamed the cache
that ``forward`` takes and returns from ``past_key_values`` to ``cache`` (argument, output field and
``create_causal_mask`` parameter). The package's modules call transformers positionally where both names
sit at the same position, and go through this module where a name is unavoidable, so that the next
release that moves something changes this file only.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

# The name of the cache in transformers' model outputs and in what `generate` passes to `forward`.
CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def accepts_both_cache_names(forward: Callable) -> Callable:
    """Decorate a ``forward`` whose cache parameter is ``cache``. From transformers 5.24 a caller's
    ``past_key_values`` goes through transformers' own deprecation (renamed, with the FutureWarning its
    models give); before 5.24 ``past_key_values`` is the current name and is renamed silently."""
    if CACHE_NAME == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @wraps(forward)
    def renamed(*args, **kwargs):
        if "past_key_values" in kwargs:
            if kwargs.get("cache") is not None:
                raise ValueError("pass the cache once: `cache` and `past_key_values` name the same argument")
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    return renamed


def with_cache(cache: Cache | None) -> dict[str, Any]:
    """``{cache field name: cache}``, to build one of transformers' model outputs."""
    return {CACHE_NAME: cache}


def output_cache(output) -> Cache | None:
    """The cache held by a model output (under the name this release gives it)."""
    return output[CACHE_NAME] if CACHE_NAME in output.keys() else None


def new_loading_info():
    """An empty transformers ``LoadStateDictInfo``: what ``from_pretrained(..., output_loading_info=True)``
    reports (``.to_dict()``) and what transformers' load report prints."""
    from transformers.utils.loading_report import LoadStateDictInfo

    return LoadStateDictInfo(missing_keys=set(), unexpected_keys=set(), mismatched_keys=set(), error_msgs=[],
                             conversion_errors={}, skipped_pp_keys=set())


def log_loading_report(model, name_or_path, ignore_mismatched_sizes: bool, info) -> None:
    """transformers' load report (missing / unexpected / re-initialised tensors), on the logger its own
    loading uses."""
    from transformers.utils import logging
    from transformers.utils.loading_report import log_state_dict_report

    log_state_dict_report(model, str(name_or_path), ignore_mismatched_sizes, info,
                          logger=logging.get_logger("transformers.modeling_utils"))


def checked_device_map(device_map):
    """transformers' normalisation of a ``from_pretrained`` ``device_map``: the device of a ``with
    torch.device(...)`` block or ``torch.set_default_device`` when none is given (and its refusal of the
    meta device), a device name, index or ``torch.device`` as ``{"": device}``."""
    from transformers.integrations.accelerate import check_and_set_device_map

    return check_and_set_device_map(device_map)
