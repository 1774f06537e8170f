"""CI: the losses work from a core-only install (`pip install -e .`, no extras).

Run with the core-only environment's python. Fails (exit 1) if a package of the `[train]`,
`[hf]` or `[trl]` extras got installed, if importing kdkernels or running a loss imports one,
if any of the four public losses fails forward + backward on small random CPU tensors
with impl='torch' or impl='auto', or if `kdk distill` / `kdk cache-teacher` do not exit with
one line naming `pip install 'kdkernels[train]'`, or if a teacher cache cannot be written
and read back.

Set KDKERNELS_NO_BUILD=1 (as .ci/run does) to keep it cheap: impl='auto' then serves from the
torch backend unless a built C++ extension for this torch is already cached; without it, the
first 'auto' call compiles the C++ extension (a few minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
import tempfile
import time

# Packages that only the extras bring; none may be installed or imported here.
EXTRA_ONLY = ("transformers", "tokenizers", "matplotlib", "tqdm", "accelerate", "trl",
              "datasets")
failures: list[str] = []

installed = [m for m in EXTRA_ONLY if importlib.util.find_spec(m) is not None]
if installed:
    failures.append(f"installed without any extra: {', '.join(installed)}")

t0 = time.perf_counter()
import torch  # noqa: E402

import kdkernels  # noqa: E402
from kdkernels import cli  # noqa: E402

print(f"core-only: torch {torch.__version__}, kdkernels {kdkernels.__version__} "
      f"({time.perf_counter() - t0:.1f} s to import)")

torch.manual_seed(0)
N, V, DS, DT, K = 12, 97, 16, 24, 5


def dense_fused(impl):
    h = torch.randn(N, DS, requires_grad=True)
    w = (torch.randn(V, DS) / DS**0.5).requires_grad_()
    g, u = torch.randn(N, DT), torch.randn(V, DT) / DT**0.5
    labels = torch.randint(0, V, (N,))
    labels[3] = -100
    loss = kdkernels.fused_linear_kd_loss(h, w, g, u, labels, divergence="jsd",
                                          ce_weight=0.5, temperature=2.0, impl=impl)
    return loss, (h, w)


def dense_logits(impl):
    z = torch.randn(N, V, requires_grad=True)
    t = torch.randn(N, V)
    loss = kdkernels.kd_loss(z, t, torch.randint(0, V, (N,)), divergence="reverse_kl",
                             ce_weight=0.2, impl=impl)
    return loss, (z,)


def _teacher_topk():
    ids = torch.stack([torch.randperm(V)[:K] for _ in range(N)])
    ids[0, -1] = -1  # an empty slot
    logprobs = torch.log_softmax(torch.randn(N, V), -1).gather(1, ids.clamp(min=0))
    return ids, logprobs


def topk_fused(impl):
    h = torch.randn(N, DS, requires_grad=True)
    w = (torch.randn(V, DS) / DS**0.5).requires_grad_()
    ids, logprobs = _teacher_topk()
    loss = kdkernels.fused_linear_topk_kd_loss(h, w, ids, logprobs, torch.randint(0, V, (N,)),
                                               tail="bucket", ce_weight=0.1, impl=impl)
    return loss, (h, w)


def topk_logits(impl):
    z = torch.randn(N, V, requires_grad=True)
    ids, logprobs = _teacher_topk()
    loss = kdkernels.topk_kd_loss(z, ids, logprobs, tail="renormalize", impl=impl)
    return loss, (z,)


for impl in ("torch", "auto"):
    for case in (dense_fused, dense_logits, topk_fused, topk_logits):
        name = f"{case.__name__}(impl={impl!r})"
        try:
            loss, leaves = case(impl)
            loss.backward()
            ok = bool(torch.isfinite(loss)) and all(
                x.grad is not None and bool(torch.isfinite(x.grad).all()) for x in leaves)
            print(f"  {name}: loss {loss.item():.5f}" + ("" if ok else "  NOT FINITE"))
            if not ok:
                failures.append(f"{name}: non-finite loss or gradient")
        except Exception as err:  # report every case, then fail
            failures.append(f"{name}: {type(err).__name__}: {err}")
            print(f"  {name}: FAILED {type(err).__name__}: {err}")

# The teacher cache needs only the core install (safetensors): write one, read it back.
try:
    with tempfile.TemporaryDirectory() as tmp:
        from kdkernels.cache import TeacherCache, write_cache

        ids, logprobs = _teacher_topk()
        write_cache(tmp, torch.randint(0, V, (3, 4)), ids[:12].reshape(3, 4, K).int(),
                    logprobs[:12].reshape(3, 4, K).bfloat16(),
                    meta={"tokenizer_hash": "core-only", "vocab_size": V})
        item = TeacherCache(tmp, verify=True)[2]
        assert item["teacher_ids"].shape == (4, K), item["teacher_ids"].shape
        print(f"  teacher cache: wrote and verified {len(TeacherCache(tmp))} sequences")
except Exception as err:
    failures.append(f"teacher cache: {type(err).__name__}: {err}")
    print(f"  teacher cache: FAILED {type(err).__name__}: {err}")

# Without the extra, `kdk distill` and `kdk cache-teacher` exit with one line naming it.
# The commands themselves are stubbed: where the extra is installed (a wrong environment),
# this must fail, not start a training run.


def _must_not_run(_args):
    raise SystemExit("the trainer command ran although the train extra should be missing")


cli._distill = cli._cache_teacher = _must_not_run
for argv in ([] if installed else (["distill"], ["cache-teacher", "--teacher", "default",
                                                 "-o", "unused"])):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as stop:
            code, err = 0, io.StringIO(f"{stop}\n")
    lines = err.getvalue().strip().splitlines()
    print(f"  kdk {argv[0]}: exit {code}: {lines[-1] if lines else ''}")
    if code == 0 or len(lines) != 1 or "pip install 'kdkernels[train]'" not in lines[0]:
        failures.append(f"kdk {argv[0]} without the train extra: exit {code}, {lines}")

backends = kdkernels.available_backends()
print("  backends: " + "; ".join(f"{k}: {str(v)[:100]}" for k, v in backends.items()))

imported = sorted({m.split(".")[0] for m in sys.modules} & set(EXTRA_ONLY))
if imported:
    failures.append(f"imported by kdkernels or a loss: {', '.join(imported)}")

if failures:
    print("core-only check FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)
print(f"core-only check passed ({time.perf_counter() - t0:.1f} s)")
