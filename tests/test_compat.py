"""The package on the installed transformers release: both cache names, and no deprecation warning that
comes from the package's own calls (transformers renames things between releases of the declared range)."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
import transformers
from packaging import version
from transformers.utils import logging as transformers_logging

import modeling_deepseek_moe
from modeling_deepseek_moe import DeepseekMoEV1ForCausalLM, DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM
from modeling_deepseek_moe.compat import CACHE_NAME, output_cache

CLASSES = {"v1": DeepseekMoEV1ForCausalLM, "v2": DeepseekMoEV2ForCausalLM, "v3": DeepseekMoEV3ForCausalLM}
PACKAGE = os.path.dirname(os.path.abspath(modeling_deepseek_moe.__file__))


def test_cache_name_follows_the_installed_release():
    renamed = version.parse(transformers.__version__) >= version.parse("5.24")
    assert CACHE_NAME == ("cache" if renamed else "past_key_values")


@pytest.mark.parametrize("family", CLASSES)
def test_both_cache_names_give_the_same_step(official_checkpoint, family):
    model = CLASSES[family].from_pretrained(official_checkpoint(family)[0])
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        new = model(ids[:, -1:], cache=output_cache(model(ids[:, :-1], use_cache=True))).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = model(ids[:, -1:], past_key_values=output_cache(model(ids[:, :-1], use_cache=True))).logits
    assert torch.equal(new, old)
    deprecations = [w for w in caught if "past_key_values" in str(w.message)]
    # The old name is transformers' deprecated one from 5.24 (the same FutureWarning its models give), current before.
    assert len(deprecations) == (1 if CACHE_NAME == "cache" else 0)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_no_deprecation_warning_comes_from_the_package(official_checkpoint, tmp_path):
    """A user's whole round (load, forward with labels, generate, train a step with activation checkpointing,
    save, reload) on every family: no Python deprecation warning raised from a file of the package, and
    no deprecation message in transformers' logs (the package is its only caller here)."""
    handler = _Records()
    transformers_logger = transformers_logging.get_logger("transformers")
    transformers_logger.addHandler(handler)
    transformers_logging.warning_once.cache_clear()  # messages logged once per process: log them again
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for family, model_class in CLASSES.items():
                directory, _, _ = official_checkpoint(family)
                model = model_class.from_pretrained(directory)
                ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0))
                with torch.no_grad():
                    model(ids, labels=ids, output_attentions=True, output_hidden_states=True)
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
                model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
                if family == "v3":
                    model.generate_with_mtp(ids[:1], max_new_tokens=3)
                model.train()
                model.activation_checkpointing_enable()
                model(ids, labels=ids).loss.backward()
                model.save_pretrained(tmp_path / family)
                model_class.from_pretrained(tmp_path / family)
    finally:
        transformers_logger.removeHandler(handler)
    # (A deprecated keyword passed to a module's forward is reported from torch's module code: recognise
    # the cache's old name by its message.)
    ours = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
            and (os.path.abspath(w.filename).startswith(PACKAGE) or "past_key_values" in str(w.message))]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    assert not [m for m in handler.messages if "deprecat" in m.lower()], handler.messages

