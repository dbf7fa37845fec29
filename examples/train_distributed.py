"""Train a tiny DeepSeek-V3 (built locally in the official layout) on several processes with PyTorch's own
engines: FSDP2 with the decoder layer as the wrap unit, and with ``--ep-size N`` expert parallelism: in
each block of N ranks every rank holds 1/N of every layer's routed experts (tokens travel by
all-to-all), blocks being data-parallel replicas (a (world / N, N) mesh). Each rank reads its own slice of
every batch; the V3 bias update all-reduces the routers' loads, so every rank applies the same one.

    torchrun --nproc-per-node 2 examples/train_distributed.py [--ep-size 2] [--steps 30]
    torchrun --nproc-per-node 4 examples/train_distributed.py --ep-size 2      # 2 replicas x 2 expert ranks
    # several machines: torchrun --nnodes 2 --node-rank R --master-addr HOST --master-port 29500 \\
    #     --nproc-per-node 8 examples/train_distributed.py --ep-size 8 --model /shared/DeepSeek-V3-bf16

gloo on CPUs, NCCL on GPUs (one GPU per process). ``--model`` loads a real checkpoint instead (a path
every rank can read; with ``--ep-size`` each rank reads only its own experts).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist

from finetune import ByteChunks
from modeling_deepseek_moe import DeepseekMoEV3ForCausalLM
from modeling_deepseek_moe.distributed import fully_shard_model
from modeling_deepseek_moe.synthetic import CORPUS, tiny_official_config, write_official_checkpoint
from modeling_deepseek_moe.training import max_violation, routers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks per block (divides the world size)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step, over all ranks")
    parser.add_argument("--model", help="an official-layout checkpoint (default: a tiny V3 built here)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model_dir = args.model or os.path.join(tempfile.gettempdir(), "deepseek-moe-distributed", "base")
    if args.model is None and rank == 0:
        write_official_checkpoint(model_dir, tiny_official_config("v3", num_nextn_predict_layers=0), num_shards=2)
    dist.barrier()

    model = DeepseekMoEV3ForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, device_map=str(device), bias_update_speed=0.01,
        ep_size=args.ep_size)
    model.activation_checkpointing_enable()
    fully_shard_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    data = ByteChunks(CORPUS, 64).chunks
    per_rank = args.batch // world
    model.train()
    for step in range(args.steps):
        start = (step * args.batch + rank * per_rank) % (len(data) - per_rank)
        ids = data[start : start + per_rank].to(device)
        output = model(ids, labels=ids, use_cache=False)
        output.loss.backward()
        optimizer.step()  # V3 bias update here, loads all-reduced over the ranks
        optimizer.zero_grad()
        loss = output.loss.detach()
        dist.all_reduce(loss)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            worst = max(max_violation(router.last_step_load) for router in routers(model).values())
            print(f"step {step:3d}  loss {loss.item() / world:.3f}  aux (rank 0) {output.aux_loss.item():.4f}  "
                  f"worst MaxVio {worst:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
