"""transformers' own model test suite (``ModelTesterMixin``, the tests every transformers model passes) run
against the V1, V2 and V3 classes, on the installed transformers release.

The tests come from transformers' source distribution of that release, fetched once by pip into a cache
folder (``~/.cache/modeling_deepseek_moe``, or ``$DEEPSEEK_MOE_TEST_CACHE``); nothing of them is copied into
this repository. The sdist does not ship ``tests/generation/`` and ``tests/exporters/``, whose mixins
``test_modeling_common.py`` imports: empty stand-ins take their place, and the generation and export
contract is tested by ``test_generation.py``.

``DEVIATIONS`` lists the tests whose convention the package deliberately does not follow, each with the
reason; every other test must pass (or be skipped by transformers' own conditions, e.g. no GPU).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.auto import modeling_auto

from modeling_deepseek_moe import (
    DeepseekMoEV1Config,
    DeepseekMoEV1ForCausalLM,
    DeepseekMoEV1ForSequenceClassification,
    DeepseekMoEV1Model,
    DeepseekMoEV2Config,
    DeepseekMoEV2ForCausalLM,
    DeepseekMoEV2ForSequenceClassification,
    DeepseekMoEV2Model,
    DeepseekMoEV3Config,
    DeepseekMoEV3ForCausalLM,
    DeepseekMoEV3ForSequenceClassification,
    DeepseekMoEV3Model,
)

STRICT_LOADING = (
    "strict loading: a backbone tensor missing from the checkpoint is a CheckpointError naming it (transformers "
    "initialises it at random and warns); only task heads are initialised fresh. That every parameter and buffer "
    "is covered by _init_weights is checked by test_checkpoint.py::test_init_weights_covers_every_tensor."
)
DEVIATIONS = {
    "test_model_weights_reload_no_missing_tied_weights": STRICT_LOADING,
    "test_can_init_all_missing_weights": STRICT_LOADING,
    "test_generation_tester_mixin_inheritance": (
        "GenerationTesterMixin lives in tests/generation/, which transformers' sdist does not ship; generation "
        "is tested by test_generation.py"
    ),
}
# Stand-ins for the mixins test_modeling_common.py imports from folders the sdist lacks.
STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}


def transformers_tests_package() -> str:
    """The folder holding package ``transformers_tests`` (the sdist's ``tests/``) for the installed release,
    fetched with pip on first use."""
    cache = Path(os.environ.get("DEEPSEEK_MOE_TEST_CACHE", Path.home() / ".cache" / "modeling_deepseek_moe"))
    root = cache / f"transformers-{transformers.__version__}-tests"
    package = root / "transformers_tests"
    if not (package / "test_modeling_common.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as download:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            f"transformers=={transformers.__version__}", "--dest", download], check=True)
            (sdist,) = Path(download).glob("transformers-*.tar.gz")
            staging = Path(tempfile.mkdtemp(dir=cache))
            with tarfile.open(sdist) as archive:
                members = [m for m in archive.getmembers() if m.name.split("/")[1:2] == ["tests"]]
                archive.extractall(staging, members=members, filter="data")
            tests = staging / f"transformers-{transformers.__version__}" / "tests"
            for relative, code in STAND_INS.items():
                if not (tests / relative).exists():
                    (tests / relative).parent.mkdir(parents=True, exist_ok=True)
                    (tests / relative).write_text(code)
                    (tests / relative).parent.joinpath("__init__.py").touch()
            (tests / "__init__.py").touch()
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(package, ignore_errors=True)
            os.replace(tests, package)  # complete or absent, also when two runs race
            shutil.rmtree(staging, ignore_errors=True)
    return str(root)


try:
    sys.path.insert(0, transformers_tests_package())
    common = importlib.import_module("transformers_tests.test_modeling_common")
    SUITE_ERROR = None
except Exception as error:  # reported by the test below, so the rest of the suite still runs
    common, SUITE_ERROR = None, error


def test_transformers_test_suite_is_available():
    assert SUITE_ERROR is None, f"could not obtain transformers' tests from its sdist: {SUITE_ERROR!r}"


class ModelTester:
    """What ``ModelTesterMixin`` reads from ``self.model_tester``: a tiny config of one family (one dense
    layer then one MoE layer, 8 routed experts, top-2, one shared expert) and its inputs."""

    batch_size, seq_length, vocab_size, hidden_size = 7, 9, 99, 32
    num_hidden_layers, num_attention_heads = 2, 4
    is_training = True

    def __init__(self, parent, config_class, base_model_class, causal_lm_class, classifier_class, **family):
        self.parent = parent
        self.config_class = config_class
        self.all_model_classes = (base_model_class, causal_lm_class, classifier_class)
        self.family = family

    def get_config(self):
        return self.config_class(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=48,
            moe_intermediate_size=16, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_attention_heads,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
            max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **self.family,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = torch.randint(3, self.vocab_size, (self.batch_size, self.seq_length))
        attention_mask = torch.tril(torch.ones_like(input_ids))  # rows padded on the right, as transformers' testers do
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
FAMILIES = {
    "V1": (DeepseekMoEV1Config, DeepseekMoEV1Model, DeepseekMoEV1ForCausalLM, DeepseekMoEV1ForSequenceClassification, {}),
    "V2": (DeepseekMoEV2Config, DeepseekMoEV2Model, DeepseekMoEV2ForCausalLM, DeepseekMoEV2ForSequenceClassification,
           dict(MLA, topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.0)),
    "V3": (DeepseekMoEV3Config, DeepseekMoEV3Model, DeepseekMoEV3ForCausalLM, DeepseekMoEV3ForSequenceClassification,
           dict(MLA, n_group=2, topk_group=1, num_nextn_predict_layers=1)),
}


def list_in_transformers_mappings() -> None:
    """The common tests decide what a class is (which labels ``_prepare_for_class`` adds, which classes
    train) from transformers' static ``*_MAPPING_NAMES``, where an out-of-tree package cannot register
    (``Auto*.register`` does not touch them): list the three families there as transformers lists its own."""
    for family in FAMILIES:
        model_type = f"deepseek_moe_{family.lower()}"
        modeling_auto.MODEL_MAPPING_NAMES.setdefault(model_type, f"DeepseekMoE{family}Model")
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(model_type, f"DeepseekMoE{family}ForCausalLM")
        modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.setdefault(
            model_type, f"DeepseekMoE{family}ForSequenceClassification")


def suite_class(family: str) -> type:
    config_class, *model_classes, settings = FAMILIES[family]

    class Suite(common.ModelTesterMixin, unittest.TestCase):
        all_model_classes = tuple(model_classes)
        test_can_init_all_missing_weights_before_2023 = True  # run it whatever the source's copyright year

        def setUp(self):
            list_in_transformers_mappings()
            self.model_tester = ModelTester(self, config_class, *model_classes, **settings)

    for name, reason in DEVIATIONS.items():
        setattr(Suite, name, unittest.skip(f"deliberate: {reason}")(lambda self: None))
    Suite.__name__ = Suite.__qualname__ = f"TestTransformersSuite{family}"
    return Suite


if common is not None:
    TestTransformersSuiteV1 = suite_class("V1")
    TestTransformersSuiteV2 = suite_class("V2")
    TestTransformersSuiteV3 = suite_class("V3")
