"""Distil a small student LM from a teacher with vocab-sharded LM heads, on CPU with gloo.

    torchrun --nproc-per-node 2 examples/tp_distill.py [--steps 30] [--vocab 8000]

Each rank holds a contiguous block of the vocabulary rows of both heads (as in Megatron's
column-parallel LM head); the trunks, the token batch and the labels are the same on every
rank. kdkernels merges the per-row softmax statistics across ranks, so no rank ever holds
logits for the whole vocabulary, and it all-reduces the hidden-state gradient, so the
replicated trunk gets identical gradients everywhere (no DDP needed).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import kdkernels


class Trunk(torch.nn.Module):
    """Token embedding plus one residual MLP block: a stand-in for a transformer body."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(2 * dim, dim))
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        return self.norm(x + self.mlp(x))


def my_rows(vocab: int, rank: int, world: int) -> slice:
    """This rank's vocabulary rows; uneven when world does not divide vocab."""
    base, extra = divmod(vocab, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=2.0)
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    torch.manual_seed(0)  # same trunks and full heads on every rank; each keeps its rows
    rows = my_rows(args.vocab, rank, world)
    teacher = Trunk(args.vocab, 256).requires_grad_(False)
    teacher_head = (torch.randn(args.vocab, 256) * 0.15)[rows].contiguous()
    student = Trunk(args.vocab, 128)
    student_head = torch.nn.Parameter((torch.randn(args.vocab, 128) * 0.02)[rows].clone())
    opt = torch.optim.AdamW([*student.parameters(), student_head], lr=3e-3)
    loss_fn = kdkernels.FusedLinearKDLoss(divergence="forward_kl", temperature=args.temperature,
                                          ce_weight=0.1, vocab_parallel=kdkernels.VocabParallel())
    data = torch.Generator().manual_seed(1)  # identical batches on every rank
    for step in range(args.steps):
        tokens = torch.randint(0, args.vocab, (args.tokens + 1,), generator=data)
        inputs, labels = tokens[:-1], tokens[1:]
        with torch.no_grad():
            t_hidden = teacher(inputs)
        res = loss_fn(student(inputs), student_head, t_hidden, teacher_head, labels)
        opt.zero_grad()
        res.backward()
        opt.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {res.item():.4f}  (rank {rank} holds vocab rows "
                  f"[{rows.start}, {rows.stop}) of {args.vocab})", flush=True)
    # The replicated trunk must still be identical on every rank.
    check = torch.stack([p.detach().double().sum() for p in student.parameters()])
    seen = [torch.empty_like(check) for _ in range(world)]
    dist.all_gather(seen, check)
    if rank == 0:
        same = all(torch.equal(s, seen[0]) for s in seen)
        print(f"student trunk identical on all {world} ranks: {same}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
