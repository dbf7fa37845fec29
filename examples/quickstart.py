"""Quickstart: build a tiny DeepSeek-V3 checkpoint in the official on-disk layout, load it with
AutoModelForCausalLM, generate, save in the official layout (with the code for trust_remote_code), reload.

    python examples/quickstart.py [--family v1|v2|v3] [--out /tmp/deepseek-moe-quickstart]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from transformers import AutoModelForCausalLM

import modeling_deepseek_moe  # noqa: F401  (registers the DeepSeek families with the Auto classes)
from modeling_deepseek_moe.synthetic import tiny_official_config, write_official_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["v1", "v2", "v3"], default="v3")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "deepseek-moe-quickstart"))
    args = parser.parse_args()

    official = os.path.join(args.out, f"official-{args.family}")
    config = tiny_official_config(args.family)
    write_official_checkpoint(official, config, num_shards=2)
    print(f"wrote a tiny official-layout {config['model_type']} checkpoint to {official}")

    model = AutoModelForCausalLM.from_pretrained(official, dtype=torch.float32)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"loaded {type(model).__name__}: {model.num_parameters():,} parameters, {routed:,} in routed experts")

    prompt = torch.tensor([[config["bos_token_id"], 17, 42, 99, 7]])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    print("greedy continuation (token ids):", generated[0, prompt.shape[1]:].tolist())

    saved = os.path.join(args.out, f"saved-{args.family}")
    model.save_pretrained(saved)
    print(f"saved to {saved}: {sorted(os.listdir(saved))}")

    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    with torch.no_grad():
        same = torch.equal(reloaded(generated).logits, model(generated).logits)
    print("reloaded model gives identical logits:", same)
    if not same:
        raise SystemExit("reloaded logits differ")


if __name__ == "__main__":
    main()
