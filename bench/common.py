"""Building blocks of the dense-teacher loss benchmark (bench/loss.py, CPU and CUDA): shapes,
inputs, providers, the GEMM floor.

Every provider computes the same loss, forward KL(teacher || student) at temperature 1 over
the full vocabulary, averaged over tokens whose label is not ``IGNORE_INDEX``, and its
gradients w.r.t. the student hidden states and the student head.

``build_provider(name, inputs)`` returns ``run(inputs) -> loss`` that does forward plus
backward; the gradients land in ``inputs.student_hidden.grad`` / ``student_weight.grad``.
Callers clear them with ``inputs.clear_grads()`` between calls, outside their timers.
Nothing here depends on the device: inputs are drawn on the CPU (so every process and every
device sees the same values for a seed) and moved to the requested device.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
KD_OPTIONS = {"divergence": "forward_kl", "temperature": 1.0}


@dataclass(frozen=True)
class Shape:
    n: int  # tokens
    vocab: int
    ds: int  # student hidden size
    dt: int  # teacher hidden size

    def __str__(self) -> str:
        return f"{self.n},{self.vocab},{self.ds},{self.dt}"


SHAPES = {"S1": Shape(2048, 32000, 512, 1024), "S2": Shape(8192, 128256, 512, 1024),
          # GPU shapes: Liger's published one (BT 8192, Ds 2048, Dt 4096), other vocabularies
          "liger": Shape(8192, 128256, 2048, 4096), "v32k": Shape(8192, 32000, 2048, 4096),
          "v152k": Shape(8192, 151936, 2048, 4096), "v262k": Shape(8192, 262144, 2048, 4096)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_shape(text: str) -> Shape:
    """A name of SHAPES or 'N,V,Ds,Dt' (positive integers)."""
    if text in SHAPES:
        return SHAPES[text]
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 1:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)} or N,V,Ds,Dt with four "
                         f"positive integers; got {text!r}")
    return Shape(*values)


def shape_name(shape: Shape) -> str:
    return next((k for k, v in SHAPES.items() if v == shape), str(shape))


@dataclass
class Inputs:
    student_hidden: torch.Tensor  # [N, Ds], requires grad
    student_weight: torch.Tensor  # [V, Ds], requires grad
    teacher_hidden: torch.Tensor  # [N, Dt]
    teacher_weight: torch.Tensor  # [V, Dt]
    labels: torch.Tensor  # [N] int64

    def clear_grads(self) -> None:
        self.student_hidden.grad = None
        self.student_weight.grad = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.student_hidden, self.student_weight, self.teacher_hidden,
                self.teacher_weight, self.labels)


def _randn(gen: torch.Generator, rows: int, cols: int, std: float, dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
    # Drawn directly in the target dtype: an fp32 temporary would inflate a bf16 run's peak.
    x = torch.randn(rows, cols, generator=gen, dtype=dtype)
    return x.mul_(std).to(device)


def make_inputs(shape: Shape, dtype: torch.dtype, device: str | torch.device = "cpu",
                seed: int = 0) -> Inputs:
    """Hidden states ~ N(0, 1), heads ~ N(0, 1/D) so that logits have unit scale; labels
    uniform over the vocabulary (all kept)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    h = _randn(gen, shape.n, shape.ds, 1.0, dtype, device).requires_grad_(True)
    w = _randn(gen, shape.vocab, shape.ds, shape.ds ** -0.5, dtype, device).requires_grad_(True)
    g = _randn(gen, shape.n, shape.dt, 1.0, dtype, device)
    u = _randn(gen, shape.vocab, shape.dt, shape.dt ** -0.5, dtype, device)
    labels = torch.randint(0, shape.vocab, (shape.n,), generator=gen).to(device)
    return Inputs(h, w, g, u, labels)


def mask_prompts(inputs: Inputs, frac: float, seq_len: int = 512) -> None:
    """Prompt-masked distillation: labels of the first ``frac`` of every ``seq_len``-token
    sequence become IGNORE_INDEX (the common SFT-style mask)."""
    n = inputs.labels.shape[0]
    if n % seq_len:
        raise ValueError(f"prompt masking needs N ({n}) to be a multiple of {seq_len}")
    labels = inputs.labels.view(-1, seq_len).clone()
    labels[:, : int(seq_len * frac)] = IGNORE_INDEX
    inputs.labels = labels.view(-1)


def naive_loss(h: torch.Tensor, w: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
               labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Full [N, V] logits, upcast to fp32 (float64 stays float64), log_softmax + kl_div."""
    acc = torch.promote_types(h.dtype, torch.float32)
    log_p = F.log_softmax((h @ w.t()).to(acc), dim=-1)
    log_q = F.log_softmax((g @ u.t()).to(acc), dim=-1)
    rows = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    keep = labels != ignore_index
    return torch.where(keep, rows, torch.zeros_like(rows)).sum() / keep.sum().clamp_min(1)


@dataclass(frozen=True)
class FloorPlan:
    chunk: int  # token rows per chunk
    logits_dtype: torch.dtype
    dz_layout: str  # where the driver puts dL/dz: kdkernels.engine.chunking.DZ_LAYOUTS
    mirrors: str  # the kdkernels backend whose chunking the floor uses


def _selected_backend(inputs: Inputs, impl: str):
    """The row backend ``impl`` resolves to for these inputs (as the loss selects it)."""
    from kdkernels.backends import registry
    from kdkernels.backends.base import RowSpec
    from kdkernels.engine import gemm
    from kdkernels.options import KDOptions

    h = inputs.student_hidden
    cd = gemm.compute_dtype(h.dtype, h.device)  # fp32 on CPUs without native bf16 GEMMs
    spec = RowSpec.from_options(KDOptions(**KD_OPTIONS), True)
    return registry.select(impl, h.device, gemm.logits_dtype(cd, h.device), spec)


class Floor:
    """The fused loss's GEMMs and nothing else: kdkernels' own driver and autograd path,
    run with a null row backend (bench/null_rows.py) that plans chunks as the ``impl``
    backend does but does no row work. Per chunk Zs = h_c W^T, Zt = g_c U^T,
    grad_h_c = dZ W, grad_W += dZ^T h_c (fp32 accumulator), dZ being whatever the driver's
    dL/dz buffer holds; then grad_W cast to W's dtype. A call returns None (no loss)."""

    def __init__(self, inputs: Inputs, impl: str = "auto",
                 max_workspace_bytes: int | None = None) -> None:
        from bench.null_rows import Seen, null_like
        from kdkernels.backends import registry

        backend = _selected_backend(inputs, impl)
        self.mirrors, self.seen = backend.name, Seen()
        null = null_like(backend, self.seen)
        registry.register(null.name, backend=null, listed=False)
        extra = {} if max_workspace_bytes is None else {"max_workspace_bytes":
                                                         max_workspace_bytes}
        self.options = {"impl": null.name, "ignore_index": IGNORE_INDEX, **KD_OPTIONS,
                        **extra}

    def __call__(self, inp: Inputs) -> None:
        import kdkernels

        kdkernels.fused_linear_kd_loss(*inp.tensors(), **self.options).backward()
        return None

    def plan(self) -> FloorPlan:
        """The driver's chunking, as its calls so far handed it to the row ops."""
        if not self.seen.rows:
            raise RuntimeError("the floor has not run yet: its chunking is not known")
        return FloorPlan(self.seen.rows, self.seen.logits_dtype, self.seen.dz_layout,
                         self.mirrors)


def build_floor(inputs: Inputs, impl: str = "auto",
                max_workspace_bytes: int | None = None) -> Floor:
    return Floor(inputs, impl, max_workspace_bytes)


def floor_plan(inputs: Inputs, impl: str = "auto",
               max_workspace_bytes: int | None = None) -> FloorPlan:
    """The chunking kdkernels' driver uses for these inputs with ``impl``: one floor call
    (the gradients it leaves are cleared)."""
    floor = Floor(inputs, impl, max_workspace_bytes)
    floor(inputs)
    inputs.clear_grads()
    return floor.plan()


def kdkernels_provider(impl: str, max_workspace_bytes: int | None = None
                       ) -> Callable[[Inputs], torch.Tensor]:
    """kdkernels' loss through its public API only (so it can time another checkout)."""
    import kdkernels

    extra = {} if max_workspace_bytes is None else {"max_workspace_bytes": max_workspace_bytes}

    def run(inp: Inputs) -> torch.Tensor:
        loss = kdkernels.fused_linear_kd_loss(*inp.tensors(), impl=impl,
                                              ignore_index=IGNORE_INDEX, **KD_OPTIONS, **extra)
        loss.backward()
        return loss.detach()

    return run


def _naive(compiled: bool) -> Callable[[Inputs], torch.Tensor]:
    fn = torch.compile(naive_loss, dynamic=False) if compiled else naive_loss

    def run(inp: Inputs) -> torch.Tensor:
        loss = fn(*inp.tensors())
        loss.backward()
        return loss.detach()

    return run


def _liger(compiled: bool) -> Callable[[Inputs], torch.Tensor]:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    # beta=0 is forward KL(teacher || student), exactly (Liger special-cases it); mean over
    # tokens whose label != ignore_index; no T**2 factor, which is 1 at T=1.
    module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                     ignore_index=IGNORE_INDEX, temperature=1.0,
                                     compiled=compiled)

    def run(inp: Inputs) -> torch.Tensor:
        loss = module(*inp.tensors())
        loss.backward()
        return loss.detach()

    return run


def trl_missing() -> str | None:
    """Why TRL's distillation loss cannot run here (None when it can)."""
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: F401
    except Exception as err:  # ImportError, or a dependency of trl failing to import
        return f"trl's DistillationTrainer loss does not import ({type(err).__name__}: {err})"
    return None


def _trl() -> Callable[[Inputs], torch.Tensor]:
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    # TRL's own chunked hidden-state loss (the one its DistillationTrainer calls): beta 0 is
    # forward KL(teacher || student) exactly; mean over the positions the mask keeps. It runs
    # its Triton kernel on GPUs and its torch tiles elsewhere.
    def run(inp: Inputs) -> torch.Tensor:
        mask = inp.labels != IGNORE_INDEX
        loss, _, _ = _chunked_divergence_loss(inp.student_hidden, inp.teacher_hidden,
                                              inp.student_weight, inp.teacher_weight, mask,
                                              beta=0.0, temperature=1.0)
        loss.backward()
        return loss.detach()

    return run


STATIC_PROVIDERS = ("floor", "naive", "naive-compiled", "liger", "liger-compiled", "trl")
KDK_PREFIX = "kdkernels:"


def discover_providers(device: str | torch.device, dtype: torch.dtype
                       ) -> tuple[list[str], dict[str, str]]:
    """(providers usable here, in run order; {provider: why it is skipped}). kdkernels
    backends come from kdkernels.available_backends() at run time."""
    import kdkernels
    from kdkernels.backends import registry
    from kdkernels.backends.base import RowSpec
    from kdkernels.engine import gemm
    from kdkernels.options import KDOptions

    device = torch.device(device)
    spec = RowSpec.from_options(KDOptions(**KD_OPTIONS), True)
    names, skipped = ["floor"], {}
    for impl, status in kdkernels.available_backends().items():
        name = KDK_PREFIX + impl
        if status != "ok":
            skipped[name] = status
            continue
        why = registry.reasons(impl, device, gemm.logits_dtype(dtype, device), spec)
        if not why and impl == "triton" and device.type == "cpu":
            why = ["runs on CPU only through the Triton interpreter, not a performance path"]
        if why:
            skipped[name] = "; ".join(why)
        else:
            names.append(name)
    names += ["naive", "naive-compiled"]
    if importlib.util.find_spec("liger_kernel") is None:
        skipped["liger"] = skipped["liger-compiled"] = "liger_kernel is not installed"
    else:
        names += ["liger", "liger-compiled"]
    why_not_trl = trl_missing()
    if why_not_trl:
        skipped["trl"] = why_not_trl
    else:
        names.append("trl")
    return names, skipped


def is_compiled(name: str) -> bool:
    return name.endswith("-compiled")


def build_provider(name: str, inputs: Inputs) -> Callable[[Inputs], torch.Tensor | None]:
    """run(inputs) -> loss (None for the floor) doing forward + backward."""
    if name == "floor":
        return build_floor(inputs)
    if name.startswith(KDK_PREFIX):
        return kdkernels_provider(name[len(KDK_PREFIX):])
    if name in ("naive", "naive-compiled"):
        return _naive(is_compiled(name))
    if name in ("liger", "liger-compiled"):
        return _liger(is_compiled(name))
    if name == "trl":
        return _trl()
    raise ValueError(f"unknown provider {name!r}; expected floor, {KDK_PREFIX}<impl>, "
                     f"naive, naive-compiled, liger, liger-compiled or trl")
