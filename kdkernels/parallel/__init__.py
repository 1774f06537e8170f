"""Vocab-parallel (tensor-parallel) distillation over torch.distributed.

Each rank of a process group holds a contiguous slice [start, start + width) of the rows of
both LM heads (as Megatron's column-parallel head does); hidden states and labels are
replicated. The chunk driver runs unchanged on the local slice and calls this module's
reducer at three points:

    merge_stats   one all-gather per chunk of the [C, len(STATS)] partial row stats (plus one header
                  row, see below), then the deterministic local merge of row_stats.py
    sum_rows      one all-gather per chunk of the [C, len(MIX)] mix sums (divergences with a mix
                  pass only), summed locally in rank order
    merge_student  sparse teachers: one all-gather per chunk of the student-only stats and the
                  logits gathered at the teacher's (global) ids, merged the same way
    finish_grad_hidden  one SUM all-reduce of grad_student_hidden (fp32), at the end

grad_weight needs no collective: each rank's head gradient is its slice of the full one.

All-gather plus a local merge in rank order makes every rank compute bit-identical row
losses, run after run. The header row carries a checksum of the call's settings, a chunk
counter and the shard bounds, so ranks that disagree raise the same error together instead
of producing different losses (every rank sees every header, so the decision is shared).

Every call first agrees on the layout (every rank's start and width) with one all-gather
of 5 int64 per rank, which also compares the settings checksum and whether each rank's own
input checks passed: an input that fails on one rank only raises on every rank, instead of
leaving the others waiting in the first chunk's collective.

Modules: ``vocab_parallel`` (the public VocabParallel), ``shard_layout`` (shard layout, its
tiling check and the per-call agreement of every rank), ``loss_setup`` (what each loss's ranks
agree on, and its reducer), ``group_reducer`` (the chunk driver's reducer over the group),
``dtensor`` (DTensor heads to local shards), ``collectives`` (the all-gather they share).
"""

from .dtensor import unwrap
from .group_reducer import VocabParallelReducer
from .loss_setup import fused_setup, logits_setup, sparse_setup
from .shard_layout import Layout
from .vocab_parallel import VocabParallel

__all__ = ["Layout", "VocabParallel", "VocabParallelReducer", "fused_setup", "logits_setup",
           "sparse_setup", "unwrap"]
