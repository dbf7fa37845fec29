"""Generation through transformers' GenerationMixin, for the three families and both attention backends.

The reference is the model itself without a cache: greedy decoding must reproduce the argmax chain of full
forwards over the growing sequence. Static caches, left padding, beams, sampling, assisted decoding and
dict outputs are checked against that and against each other; compiled decoding against eager decoding;
an exported program against the eager model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

from modeling_deepseek_moe import DeepseekMoEV1ForCausalLM, DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM
from modeling_deepseek_moe.synthetic import tiny_official_config, write_official_checkpoint

from conftest import relative_error

CLASSES = {"v1": DeepseekMoEV1ForCausalLM, "v2": DeepseekMoEV2ForCausalLM, "v3": DeepseekMoEV3ForCausalLM}
STEPS = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folders = {}
    for family in CLASSES:
        folders[family] = tmp_path_factory.mktemp(family)
        write_official_checkpoint(folders[family], tiny_official_config(family), seed=3)
    return folders


def load(checkpoints, family, attn="sdpa", **overrides):
    return CLASSES[family].from_pretrained(checkpoints[family], attn_implementation=attn, **overrides)


def prompt(batch=2, length=7, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def argmax_chain(model, ids, steps=STEPS):
    """Greedy continuation by full forwards, no cache."""
    for _ in range(steps):
        ids = torch.cat((ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)), dim=1)
    return ids


GREEDY = dict(max_new_tokens=STEPS, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", CLASSES)
def test_greedy_dynamic_and_static_caches_equal_the_full_forward_chain(checkpoints, family, attn):
    model = load(checkpoints, family, attn)
    ids = prompt()
    expected = argmax_chain(model, ids)
    assert torch.equal(model.generate(ids, **GREEDY), expected)
    assert torch.equal(model.generate(ids, cache_implementation="static", **GREEDY), expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", CLASSES)
def test_left_padded_rows_generate_what_each_row_generates_alone(checkpoints, family, attn):
    model = load(checkpoints, family, attn)
    ids = prompt(batch=3, length=9, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    for cache in ("dynamic", "static"):
        batched = model.generate(ids, attention_mask=mask, cache_implementation=cache, **GREEDY)
        for row in range(3):
            alone = model.generate(ids[row : row + 1, mask[row].bool()], cache_implementation=cache, **GREEDY)
            assert torch.equal(batched[row, -STEPS:], alone[0, -STEPS:]), (cache, row)


@pytest.mark.parametrize("family", CLASSES)
def test_beams_sampling_and_assisted_decoding(checkpoints, family):
    model = load(checkpoints, family)
    ids = prompt()
    greedy = model.generate(ids, **GREEDY)
    beams = model.generate(ids, num_beams=3, num_return_sequences=2, **GREEDY)
    assert beams.shape == (4, ids.shape[1] + STEPS)
    one_beam = model.generate(ids, num_beams=1, **GREEDY)
    assert torch.equal(one_beam, greedy)
    torch.manual_seed(0)
    sampled = model.generate(ids, do_sample=True, top_k=5, max_new_tokens=STEPS, pad_token_id=0)
    torch.manual_seed(0)
    assert torch.equal(model.generate(ids, do_sample=True, top_k=5, max_new_tokens=STEPS, pad_token_id=0), sampled)
    # Assisted decoding with the model as its own assistant verifies several tokens per step (absorbed MLA
    # steps of 2-8 new tokens) and must give the greedy tokens; so must prompt lookup.
    assisted = model.generate(ids[:1], assistant_model=load(checkpoints, family), **GREEDY)
    assert torch.equal(assisted, greedy[:1])
    assert torch.equal(model.generate(ids[:1], prompt_lookup_num_tokens=3, **GREEDY), greedy[:1])


@pytest.mark.parametrize("family", CLASSES)
def test_dict_outputs_hold_scores_one_attention_map_per_layer_and_hidden_states(checkpoints, family):
    model = load(checkpoints, family, "eager")
    ids = prompt()
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    out = model.generate(ids, return_dict_in_generate=True, output_scores=True, output_logits=True,
                         output_attentions=True, output_hidden_states=True, **GREEDY)
    assert torch.equal(out.sequences, model.generate(ids, **GREEDY))
    assert len(out.scores) == len(out.logits) == len(out.attentions) == len(out.hidden_states) == STEPS
    for step, (maps, states) in enumerate(zip(out.attentions, out.hidden_states)):
        queries, keys = (ids.shape[1], ids.shape[1]) if step == 0 else (1, ids.shape[1] + step)
        assert len(maps) == layers and len(states) == layers + 1
        assert all(m.shape == (2, heads, queries, keys) for m in maps), [m.shape for m in maps]
    # Decoding steps of MLA models attend in the latent space (absorbed): their maps equal the expanded form's.
    if model.config.attention_type == "mla":
        expanded = load(checkpoints, family, "eager", mla_absorb="never")
        reference = expanded.generate(ids, return_dict_in_generate=True, output_attentions=True, **GREEDY)
        for step in range(1, STEPS):
            for ours, theirs in zip(out.attentions[step], reference.attentions[step]):
                assert relative_error(ours, theirs) < 1e-5


@pytest.mark.parametrize("family", CLASSES)
def test_return_dict_false_returns_the_tuple_of_the_output(checkpoints, family):
    model = load(checkpoints, family)
    ids = prompt()
    labels = ids.clone()
    with torch.no_grad():
        as_dict = model(ids, labels=labels)
        as_tuple = model(ids, labels=labels, return_dict=False)
        base = model.model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    assert torch.equal(base[0], model.model(ids).last_hidden_state)


@pytest.mark.parametrize("family", ["v1", "v3"])
def test_compiled_static_cache_decoding_gives_the_eager_tokens(checkpoints, family):
    model = load(checkpoints, family)
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(attention_mask=mask, cache_implementation="static", **GREEDY)
    eager = model.generate(ids, disable_compile=True, **kwargs)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only by default
    torch._dynamo.reset()
    assert torch.equal(model.generate(ids, compile_config=compile_config, **kwargs), eager)


@pytest.mark.parametrize("family", CLASSES)
def test_exported_program_round_trips_and_equals_the_eager_model(checkpoints, family, tmp_path):
    model = load(checkpoints, family)
    ids = prompt()
    with torch.no_grad():
        program = torch.export.export(model, (ids,), kwargs={"use_cache": False})
        torch.export.save(program, tmp_path / "program.pt2")
        restored = torch.export.load(tmp_path / "program.pt2").module()
        other = prompt(seed=5)  # other tokens route differently: the expert path must not be specialised
        for inputs in (ids, other):
            assert relative_error(restored(inputs, use_cache=False).logits, model(inputs).logits) < 1e-5
