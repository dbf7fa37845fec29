"""Serve what this package saves with llama.cpp: tiny V1, V2 and V3 models saved with ``save_pretrained``
(DeepSeek's tensor layout, DeepSeek's architecture name in config.json), converted with llama.cpp's own
converter (``convert_hf_to_gguf.py`` from the source distribution of the installed llama-cpp-python) to an
f32 GGUF, and run with llama-cpp-python. Logits and greedy tokens are compared with this package's on token
ids (the tiny vocabularies are synthetic: ids, not text). Prints a table; ``--json`` writes the figures.

Needs the optional extra, which builds llama.cpp from source (about 7 minutes on 2 cores):

    pip install -e ".[llama-cpp]"
    python examples/serve_with_llama_cpp.py [--json benchmarks/results/llama_cpp_interop.json]

The converter refuses a BPE tokenizer whose pre-tokenizer it does not know by a hash of its output on a fixed
text, which a tiny tokenizer trained here cannot match; the conversion runs with that one check answered
"gpt-2" (the tiny tokenizer's byte-level pre-tokenizer). A real DeepSeek tokenizer passes the check as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from modeling_deepseek_moe import DeepseekMoEV1ForCausalLM, DeepseekMoEV2ForCausalLM, DeepseekMoEV3ForCausalLM
from modeling_deepseek_moe.synthetic import tiny_official_config, write_fp8_official_checkpoint, write_official_checkpoint

CLASSES = {"v1": DeepseekMoEV1ForCausalLM, "v2": DeepseekMoEV2ForCausalLM, "v3": DeepseekMoEV3ForCausalLM}
# The tiny configs that llama.cpp runs as DeepSeek does, and those where it departs from DeepSeek's code.
V2_GREEDY = {"topk_method": "greedy", "n_group": 1, "topk_group": 1}
CASES = {
    "v1": ("v1", {}),
    "v2": ("v2", V2_GREEDY),  # greedy top-k, as V2-Lite (16x scaling of unnormalised weights, as V2)
    "v3": ("v3", {}),
    "v3 fp8": ("v3", {"fp8": True}),  # block-wise FP8 weights with weight_scale_inv, as DeepSeek-V3 ships
    # llama.cpp departs from DeepSeek's code here:
    "v2 group-limited": ("v2", {}),  # groups scored with V3's top-2 sum (DeepSeek-V2: the group's max)
    "v2 normalised": ("v2", {**V2_GREEDY, "norm_topk_prob": True}),  # scaling applied after normalising too
    "v1 normalised": ("v1", {"norm_topk_prob": True}),  # V1's norm_topk_prob ignored
}
SURVIVING = ("v1", "v2", "v3", "v3 fp8")
PROMPT = [17, 42, 99, 7, 256, 300, 5, 64]  # token ids after BOS
NEW_TOKENS = 12
# Runs llama.cpp's converter with its pre-tokenizer check answered for the tiny tokenizer (see above).
CONVERTER_SHIM = """
import sys
converter = sys.argv.pop(1)
sys.path[:0] = [converter, converter + "/gguf-py"]
from conversion import base
known = base.TextModel.get_vocab_base_pre
def pre_tokenizer(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre_tokenizer
import convert_hf_to_gguf
sys.argv[0] = "convert_hf_to_gguf.py"
convert_hf_to_gguf.main()
"""


def converter_directory() -> Path:
    """llama.cpp's converter (``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``) from the sdist of the
    installed llama-cpp-python, fetched by pip once into ``~/.cache/modeling_deepseek_moe``."""
    import llama_cpp

    version = llama_cpp.__version__
    root = Path(os.environ.get("DEEPSEEK_MOE_TEST_CACHE", Path.home() / ".cache" / "modeling_deepseek_moe"))
    converter = root / f"llama.cpp-{version}"
    if (converter / "convert_hf_to_gguf.py").is_file():
        return converter
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as work:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "--dest", work], check=True)
        (sdist,) = Path(work).glob("llama_cpp_python-*.tar.gz")
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with tarfile.open(sdist) as archive:
            prefix = f"{archive.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            members = [m for m in archive.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
            archive.extractall(work, members=members, filter="data")
        os.replace(Path(work) / prefix, converter)  # complete or absent
    return converter


def convert(folder: Path, gguf: Path) -> None:
    run = subprocess.run([sys.executable, "-c", CONVERTER_SHIM, str(converter_directory()), str(folder),
                          "--outtype", "f32", "--outfile", str(gguf)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {folder}:\n{run.stderr[-3000:]}")


def llama_cpp_run(gguf: Path, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    """llama.cpp's logits of every position of ``ids`` ``[positions, vocab]`` and its greedy continuation."""
    from llama_cpp import Llama

    # f32 cache (llama.cpp caches keys and values in f16 by default: ~1e-3 on these logits)
    llm = Llama(model_path=str(gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
    llm.eval(ids)
    logits = torch.tensor(llm.scores[: len(ids)]).float()
    continuation = []
    for _ in range(NEW_TOKENS):
        token = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
        continuation.append(token)
        llm.eval([token])
    return logits, continuation


def compare(case: str, work: Path) -> dict:
    family, overrides = CASES[case]
    official, saved = work / f"{case}-official", work / f"{case}-saved"
    overrides = dict(overrides)
    if overrides.pop("fp8", False):
        config = write_fp8_official_checkpoint(official, family, **overrides)
    else:
        config = tiny_official_config(family, **overrides)
        write_official_checkpoint(official, config)
    model = CLASSES[family].from_pretrained(official, dtype=torch.float32)  # FP8 weights stay FP8
    model.save_pretrained(saved)
    gguf = work / f"{case}.gguf"
    convert(saved, gguf)
    ids = [config["bos_token_id"], *PROMPT]
    theirs, their_tokens = llama_cpp_run(gguf, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
        generated = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=config["eos_token_id"], eos_token_id=None)
    our_tokens = generated[0, len(ids):].tolist()
    error = ((theirs - ours).norm() / ours.norm()).item()
    return {"case": case, "architecture": json.loads((saved / "config.json").read_text())["architectures"][0],
            "logits_relative_error": error, "same_greedy_tokens": our_tokens == their_tokens,
            "tokens_ours": our_tokens, "tokens_llama_cpp": their_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES),
                        help=f"configs to run (default: all; {', '.join(SURVIVING)} are those llama.cpp runs as DeepSeek does)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = [compare(case, Path(work)) for case in args.cases]
    print(f"{'case':<20}{'config.json architectures':<28}{'logits rel. error':>18}{'same greedy tokens':>20}")
    for row in results:
        print(f"{row['case']:<20}{row['architecture']:<28}{row['logits_relative_error']:>18.1e}"
              f"{str(row['same_greedy_tokens']):>20}")
    if args.json:
        import llama_cpp

        with open(args.json, "w") as handle:
            json.dump({"llama_cpp_python": llama_cpp.__version__, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
