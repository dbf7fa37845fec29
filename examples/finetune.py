"""Fine-tune a tiny DeepSeek model (built locally in the official layout) on a small text file with
transformers' Trainer and gradient accumulation 2: the loss falls, the routers' MaxVio falls, V3's
correction biases move (once per optimizer step). ``--lora`` trains PEFT LoRA adapters instead
(attention, dense MLPs, shared and routed experts); ``--qlora`` trains them on a bitsandbytes nf4 base
(routed experts included, bf16 compute) prepared by ``peft.prepare_model_for_kbit_training``. ``--fsdp`` shards the model with accelerate's FSDP2
plugin (the decoder layer as the wrap unit), launched on GPUs with torchrun or ``accelerate launch``:

    python examples/finetune.py [--family v3] [--steps 60] [--lora | --qlora]
    torchrun --nproc-per-node 8 examples/finetune.py --fsdp

(accelerate 1.15 applies FSDP on accelerators only: on CPU processes it falls back to DDP, and says so.)

The text is tokenised by the tiny model's own tokenizer (a byte-level BPE saved with the checkpoint), and
the fine-tuned model is saved with it: ``pipeline("text-generation", model=OUT/final)`` works on text.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

FAMILIES = ("v1", "v2", "v3")


class TextChunks(torch.utils.data.Dataset):
    """Consecutive ``length``-token windows of a text file, tokenised by ``tokenizer`` (inputs = labels)."""

    def __init__(self, path: str, tokenizer, length: int) -> None:
        with open(path, encoding="utf-8") as handle:
            ids = torch.tensor(tokenizer(handle.read(), add_special_tokens=False).input_ids, dtype=torch.long)
        self.chunks = ids[: len(ids) // length * length].view(-1, length)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.chunks[index], "labels": self.chunks[index]}


# FSDP2 with one unit per decoder layer (accelerate shards the embedding, norm and head with the root).
FSDP_ARGUMENTS = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["DeepseekMoEDecoderLayer"]})


def biases_agree(model: torch.nn.Module) -> bool:
    """Whether every rank holds the same V3 correction biases (the bias update all-reduces the loads)."""
    import torch.distributed as dist

    from modeling_deepseek_moe.training import routers

    biases = [r.e_score_correction_bias for r in routers(model).values() if r.e_score_correction_bias is not None]
    if not biases or not dist.is_initialized():
        return True
    mine = torch.cat(biases)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(mine, other) for other in gathered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, default="v3")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--qlora", action="store_true", help="LoRA on a bitsandbytes 4-bit (nf4) base")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 through Trainer's accelerate plugin (GPUs)")
    parser.add_argument("--bias-update-speed", type=float, default=0.01,
                        help="V3's gamma; larger than DeepSeek's 0.001 because this run is 60 steps, not 14.8T tokens")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "deepseek-moe-finetune"))
    args = parser.parse_args()
    if args.qlora and args.fsdp:
        parser.error("--qlora and --fsdp: FSDP of a bitsandbytes 4-bit model is not supported here")
    adapters = " with QLoRA (nf4 base)" if args.qlora else " with LoRA" if args.lora else ""
    rank = int(os.environ.get("RANK", 0))
    say = print if rank == 0 else (lambda *_, **__: None)
    # transformers' Trainer takes seconds to import: say what is coming first.
    say(f"fine-tuning a tiny {args.family.upper()} for {args.steps} steps{adapters}; "
        "importing transformers", flush=True)
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from modeling_deepseek_moe import DeepseekMoEV1ForCausalLM, DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM
    from modeling_deepseek_moe.synthetic import CORPUS, WHOLE_BLOCK_WIDTHS, tiny_official_config, write_official_checkpoint
    from modeling_deepseek_moe.training import RouterStatsCallback, routers

    classes = dict(zip(FAMILIES, (DeepseekMoEV1ForCausalLM, DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM)))
    official = os.path.join(args.out, f"base-{rank}")  # one per process: the same seeded weights
    # LoRA and QLoRA on the same model, of bitsandbytes' whole blocks (see synthetic.py): their losses compare
    widths = WHOLE_BLOCK_WIDTHS[args.family] if args.lora or args.qlora else {}
    write_official_checkpoint(official, tiny_official_config(args.family, **widths), num_shards=1)
    tokenizer = AutoTokenizer.from_pretrained(official)
    quantization = {"quantization_config": nf4_config()} if args.qlora else {}
    model = classes[args.family].from_pretrained(official, dtype=torch.float32, bias_update_speed=args.bias_update_speed,
                                                 pad_token_id=tokenizer.pad_token_id, **quantization)
    say(f"built and loaded {official}{' in 4 bits' if args.qlora else ''}", flush=True)
    if args.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    if args.lora or args.qlora:
        from peft import get_peft_model

        from modeling_deepseek_moe.lora import lora_config

        model = get_peft_model(model, lora_config(r=8, lora_alpha=16))
        model.print_trainable_parameters()
    biases_before = [r.e_score_correction_bias.clone() for r in routers(model).values() if r.e_score_correction_bias is not None]

    training = TrainingArguments(
        output_dir=os.path.join(args.out, "run"), max_steps=args.steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=3e-3 if args.lora or args.qlora else 1e-3, warmup_steps=5,
        logging_steps=min(10, args.steps), save_strategy="no", report_to=[],
        use_cpu=not (args.fsdp and torch.cuda.is_available()), disable_tqdm=False, seed=0,
        **(FSDP_ARGUMENTS if args.fsdp else {}),
    )
    data = TextChunks(CORPUS, tokenizer, 48)
    trainer = Trainer(model=model, args=training, train_dataset=data, processing_class=tokenizer,
                      callbacks=[RouterStatsCallback()])
    trainer.train()
    agree = biases_agree(model)  # a collective: every rank takes part
    history = [entry for entry in trainer.state.log_history if "loss" in entry and "moe/max_vio" in entry]
    main_process, accelerator = trainer.is_world_process_zero(), trainer.accelerator
    if main_process and not args.fsdp:  # FSDP shards the parameters: gather them (get_state_dict) to save
        trainer.save_model(os.path.join(args.out, "final"))
    del trainer  # with the DDP wrapper that holds the process group
    end_process_group()
    if not main_process:
        return
    if args.fsdp:
        print(f"accelerate's distributed type: {accelerator.distributed_type}; V3 correction biases "
              f"identical on all {accelerator.num_processes} ranks: {agree}")
    first, last = history[0], history[-1]
    print(f"\n{'':<12}{'loss':>10}{'MaxVio (mean over layers)':>28}")
    print(f"{'first log':<12}{first['loss']:>10.3f}{first['moe/max_vio']:>28.3f}")
    print(f"{'last log':<12}{last['loss']:>10.3f}{last['moe/max_vio']:>28.3f}")
    if biases_before:
        moved = [(r.e_score_correction_bias - b).abs().max().item()
                 for r, b in zip([r for r in routers(model).values() if r.e_score_correction_bias is not None], biases_before)]
        print(f"largest V3 correction-bias move per layer: {[round(m, 4) for m in moved]}")
    if not args.fsdp:
        print(f"saved to {os.path.join(args.out, 'final')}")


def nf4_config():
    """QLoRA's usual base: nf4 with double quantization, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def end_process_group() -> None:
    """Destroy the process group (if any) now, once the DDP wrapper that also holds it is gone.

    Left to the end of the interpreter, gloo's worker threads can still be releasing the last collective's
    tensors, which needs the GIL, while Python finalizes: CPython then ends the thread inside a C++
    destructor and the process aborts ("terminate called without an active exception", SIGABRT). The
    order matters too: destroyed while DDP's reducer still holds it, the group is freed later with the
    reducer, whose destructor keeps the GIL while it joins those threads (a deadlock). Freed here, from
    torch's Python object for it, the GIL is released while the threads are joined."""
    import gc

    import torch.distributed as dist

    gc.collect()  # in case a reference cycle still holds the DDP wrapper
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
