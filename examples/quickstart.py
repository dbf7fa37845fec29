"""Quickstart: build a tiny DeepSeek checkpoint in the official on-disk layout (DeepSeek's config.json
schema, per-expert tensors, sharded safetensors, a small tokenizer), load it with this package's class,
generate from text, save it (official layout, with the code for trust_remote_code and the tokenizer) and
reload it through AutoModelForCausalLM and a text-generation pipeline.

    python examples/quickstart.py [--family v1|v2|v3] [--out /tmp/deepseek-moe-quickstart]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from modeling_deepseek_moe import DeepseekMoEV1ForCausalLM, DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM
from modeling_deepseek_moe.synthetic import tiny_official_config, write_official_checkpoint

# DeepSeek's folders say model_type "deepseek" / "deepseek_v2" / "deepseek_v3": name this package's class
# (for V2 and V3 the Auto classes would pick transformers' own DeepseekV2/V3 implementation).
CLASSES = {"v1": DeepseekMoEV1ForCausalLM, "v2": DeepseekMoEV2ForCausalLM, "v3": DeepseekMoEV3ForCausalLM}
PROMPT = "DeepSeek-V3 routes every token to"


def describe(model) -> str:
    config = model.config
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    return (f"{type(model).__name__}: {config.num_hidden_layers} layers ({moe_layers} MoE), "
            f"{config.n_routed_experts} routed experts per MoE layer (top-{config.num_experts_per_tok}) "
            f"+ {config.n_shared_experts} shared, {model.num_parameters():,} parameters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(CLASSES), default="v3")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "deepseek-moe-quickstart"))
    args = parser.parse_args()

    official = os.path.join(args.out, f"official-{args.family}")
    config = tiny_official_config(args.family)
    write_official_checkpoint(official, config, num_shards=2)
    print(f"wrote a tiny {config['model_type']} checkpoint in DeepSeek's layout to {official}")

    model = CLASSES[args.family].from_pretrained(official, dtype=torch.float32)
    print("loaded", describe(model))

    tokenizer = AutoTokenizer.from_pretrained(official)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(f"greedy continuation of {PROMPT!r} (random weights):",
          repr(tokenizer.decode(generated[0, inputs.input_ids.shape[1]:])))

    saved = os.path.join(args.out, f"saved-{args.family}")
    model.save_pretrained(saved)  # the official layout, our config with auto_map, the code, the tokenizer
    print(f"saved to {saved}: {sorted(os.listdir(saved))}")

    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    with torch.no_grad():
        same = torch.equal(reloaded(generated).logits, model(generated).logits)
    print(f"reloaded through AutoModelForCausalLM as {type(reloaded).__name__}; identical logits: {same}")
    if not same:
        raise SystemExit("reloaded logits differ")
    generator = pipeline("text-generation", model=saved, dtype=torch.float32)
    text = generator(PROMPT, max_new_tokens=16, do_sample=False)[0]["generated_text"]
    print("the same through pipeline('text-generation'):", repr(text[len(PROMPT):]))


if __name__ == "__main__":
    main()
