"""--teacher-url: a teacher in an inference server (vLLM, SGLang or `kdk serve-teacher`)
instead of a teacher model in this process.

The student is --student (with its tokenizer) or, without it, the embedded default student on
the embedded tokenizer, as with --teacher-cache; it trains on the windows the in-process run
reads (--data, else the embedded corpus). The server labels each window online:

- top-k mode: its top-K ids and log-probs (`score`), for the top-k loss, exactly what a
  `kdk cache-teacher` cache would hold for that window;
- hidden mode (kdk servers): its final hidden states, with its LM head fetched once, so the
  dense fused loss runs unchanged: exact full-vocabulary KD.

The client (kdkernels.teachers) probes the server's tokenizer against the student's, retries
a failing server and then raises; a run that loses its server stops with TeacherStopped,
naming the URL and the checkpoint that --resume continues from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..batches import streams
from ..batches.served import ServedBatches
from ..config import TrainConfig
from ..runtime import checkpoint, distributed
from . import tiny_llama, training_data

SERVERS = ("vllm", "sglang", "kdk")
MODES = ("topk", "hidden")
TOPK, HIDDEN = MODES


class TeacherStopped(ValueError):
    """The server stayed unreachable (or answered wrongly) after the client's retries: the
    run stops, its last checkpoint intact. A ValueError, so `kdk distill` reports it as
    `kdk distill: error: ...` with exit status 2."""


@dataclass(frozen=True)
class ServedTeacher:
    """The --teacher-* options of a served teacher."""

    url: str
    server: str = "kdk"
    mode: str = TOPK
    top_k: int = 64
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 3

    def check(self) -> None:
        """Refusals that need no server, each naming its flag."""
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--teacher-url must be an http:// or https:// URL (e.g. "
                             f"http://127.0.0.1:8000); got {self.url!r}")
        if self.server not in SERVERS:
            raise ValueError(f"--teacher-server must be one of {', '.join(SERVERS)}; got "
                             f"{self.server!r}")
        if self.mode not in MODES:
            raise ValueError(f"--teacher-mode must be one of {', '.join(MODES)}; got "
                             f"{self.mode!r}")
        if self.mode == HIDDEN and self.server != "kdk":
            raise ValueError(f"--teacher-mode hidden needs --teacher-server kdk (the /v1/hidden "
                             f"and /v1/head routes of `kdk serve-teacher`); a {self.server} "
                             f"server returns log-probs only: use --teacher-mode topk with "
                             f"--teacher-server {self.server}")
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1; got {self.top_k}")
        if not self.timeout > 0:
            raise ValueError(f"--teacher-timeout must be > 0 seconds; got {self.timeout}")
        if self.retries < 0:
            raise ValueError(f"--teacher-retries must be >= 0; got {self.retries}")

    def fingerprint(self) -> dict[str, Any]:
        """What --resume must find unchanged (K only where it shapes the targets)."""
        return {"teacher_url": self.url.rstrip("/"), "teacher_server": self.server,
                "teacher_mode": self.mode,
                "teacher_top_k": self.top_k if self.mode == TOPK else None}

    def describe(self) -> str:
        k = f", K = {self.top_k}" if self.mode == TOPK else ""
        return f"{self.url} ({self.server} server, {self.mode} mode{k})"

    def stage(self) -> str:
        """The name of the student it trains: "topk" (top-k loss) or "kd" (dense loss)."""
        return "topk" if self.mode == TOPK else "kd"

    def label(self) -> str:
        """The student's row in the report."""
        if self.mode == TOPK:
            return f"student, top-{self.top_k} KD (served, {self.server})"
        return "student, KD (served hidden states, exact)"


@dataclass
class ServedInputs:
    options: ServedTeacher
    student: torch.nn.Module  # the initial weights
    tok: Any
    batches: ServedBatches
    held: list  # held-out batches
    summary: str  # the data, for the report
    client: Any  # the kdkernels.teachers client (closed by the caller)
    head: tuple[torch.Tensor, torch.Tensor | None] | None  # hidden mode: (weight, bias)
    logit_transform: tuple[float, float | None]  # hidden mode: the teacher's (scale, softcap)


def open_inputs(cfg: TrainConfig, served: ServedTeacher, student_path: str | None,
                data: str | None, world: distributed.World) -> ServedInputs:
    """The student, its tokenizer and data, and the client (its tokenizer probed against the
    student's); in hidden mode the teacher's head, fetched once."""
    from ...teachers import make_teacher
    from ...teachers.errors import TeacherError

    student, tok, name = _student(cfg, student_path, world)
    d = training_data.prepare(cfg, data, tok, world)
    tok = d.tok
    if student is None:  # the embedded student, on the embedded tokenizer just loaded
        torch.manual_seed(cfg.seed)
        student = tiny_llama.build_llama(cfg.student_size, len(tok), cfg.seq_len,
                                         eos_id=tok.eos_token_id)
    if served.mode == TOPK and isinstance(d.train, streams.TokenStream):
        raise ValueError("--teacher-mode topk: prompt/completion --data needs a prompt mask, "
                         "which the top-k loss does not take; use --teacher-mode hidden or "
                         "text records")
    held = streams.eval_batches(d.held, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    try:
        client = make_teacher(served.server, served.url, top_k=served.top_k,
                              timeout=served.timeout, retries=served.retries,
                              api_key=served.api_key, tokenizer=tok)
    except TeacherError as err:  # unreachable, or refused the probe: nothing trained yet
        raise ValueError(f"--teacher-url {served.url}: {err}") from err
    head, transform = None, (1.0, None)
    try:
        client.check()  # K against the server's limit, the tokenizer probe: before training
        if served.mode == HIDDEN:
            head = client.head()
            transform = client.logit_transform()
            _check_head(head[0], student, tok, served, name)
    except TeacherError as err:
        client.close()
        raise ValueError(f"--teacher-url {served.url}: {err}") from err
    except BaseException:
        client.close()
        raise
    targets = _targets(client, served)
    batches = ServedBatches(d.train, targets, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                            steps=cfg.max_steps, grad_accum=cfg.grad_accum)
    return ServedInputs(served, student, tok, batches, held, d.summary, client, head, transform)


def _student(cfg: TrainConfig, student_path: str | None, world: distributed.World):
    """(--student model or None for the embedded one, its tokenizer or None, its name)."""
    if student_path is None:
        return None, None, "the embedded default student (no --student)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    student = AutoModelForCausalLM.from_pretrained(student_path).to(world.device)
    try:
        tok = AutoTokenizer.from_pretrained(student_path)
    except (OSError, ValueError):
        raise ValueError(f"--student {student_path} has no tokenizer to check against the "
                         "--teacher-url server's; save the tokenizer with the student") from None
    return student, tok, f"--student {student_path}"


def _check_head(weight: torch.Tensor, student: torch.nn.Module, tok, served: ServedTeacher,
                name: str) -> None:
    """The dense loss compares the first min(rows) logits of the two heads: both must cover
    the shared tokenizer (heads may be padded beyond it, never smaller)."""
    from ...hf import models

    n, vt = len(tok), int(weight.shape[0])
    vs = models.rows(models.head(student)[0])
    if vt < n or vs < n:
        raise ValueError(f"--teacher-url {served.url}: the tokenizer has {n} tokens but the "
                         f"served head has {vt} rows and {name} has {vs}; both heads need at "
                         f"least {n} rows")


def _targets(client, served: ServedTeacher):
    """The batch tensors the server adds to a window [B, S]."""
    if served.mode == TOPK:
        def topk(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
            ids, logprobs = client.score(input_ids)
            return {"teacher_ids": ids, "teacher_logprobs": logprobs}
        return topk

    def hidden(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"teacher_hidden": client.hidden_states(input_ids)}
    return hidden


def stopped(err: BaseException, served: ServedTeacher, stage_dir: Path,
            step: int | None) -> TeacherStopped:
    """The error that ends a run whose server failed: the URL, the step, what the client
    said, the checkpoint left intact and how to continue."""
    latest = checkpoint.latest(stage_dir)
    kept = (f"the last checkpoint, {latest}, is intact" if latest is not None
            else "no checkpoint was saved before it (--save-every N saves every N steps)")
    at = f" at step {step + 1}" if step is not None else ""
    return TeacherStopped(f"the teacher server at {served.url} ({served.server}) failed{at}: "
                          f"{err}; {kept}; restart the server and rerun the same command with "
                          "--resume")


def timing_line(timing: dict[str, Any], wall_s: float) -> str:
    """The report's line: time blocked on the teacher and its share of the training time."""
    share = timing["wait_s"] / wall_s if wall_s > 0 else 0.0
    return (f"{timing['wait_s']:.2f} s blocked on the teacher's answers, {share:.1%} of the "
            f"student's {wall_s:.1f} s of training; {timing['fetches']} requests taking "
            f"{timing['fetch_s']:.2f} s, {timing['prefetched']} of them prefetched while the "
            "previous step trained")
