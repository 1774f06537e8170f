"""DTensor heads (FSDP2 / tensor parallel): their local shards and the layout they imply."""

from __future__ import annotations

import torch

from .vocab_parallel import VocabParallel


def _dtensor_shard(t: torch.Tensor | None, name: str, dim: int):
    """(local tensor, process group, vocab_start) for a DTensor sharded on `dim`, else None."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch built without distributed tensors
        return None
    if not isinstance(t, DTensor):
        return None
    dim = dim % t.dim()
    shard_dims = [i for i, p in enumerate(t.placements) if isinstance(p, Shard)]
    others_ok = all(isinstance(p, (Shard, Replicate)) for p in t.placements)
    if len(shard_dims) != 1 or not others_ok or t.placements[shard_dims[0]].dim != dim:
        raise ValueError(f"{name}: a DTensor head must be sharded on dim {dim} over exactly one "
                         f"mesh dimension and replicated over the others; got placements "
                         f"{t.placements}")
    mesh_dim = shard_dims[0]
    mesh = t.device_mesh
    parts = mesh.size(mesh_dim)
    coord = mesh.get_coordinate()[mesh_dim]
    # Shard follows torch.chunk: ceil(V / parts) rows per rank, the last ones shorter.
    per = -(-t.shape[dim] // parts)
    return t.to_local(), mesh.get_group(mesh_dim), min(coord * per, t.shape[dim])


def unwrap(vp: VocabParallel | None, named: dict[str, torch.Tensor | None], dim: int
           ) -> tuple[VocabParallel | None, dict[str, torch.Tensor | None]]:
    """Replace DTensor shards by their local tensors; infer vocab_parallel from them."""
    out = dict(named)
    found = {}
    for name, t in named.items():
        got = _dtensor_shard(t, name, dim if "bias" not in name else 0)
        if got is not None:
            out[name], group, start = got
            found[name] = (group, start)
    if not found:
        return vp, out
    (first, (group, start)), *rest = found.items()
    for name, (g, s) in rest:
        if g is not group or s != start:
            raise ValueError(f"vocab_parallel: DTensor {name} is sharded over another group or "
                             f"offset than {first}")
    if vp is not None and vp.group is not None and vp.group is not group:
        raise ValueError(f"vocab_parallel.group differs from the group {first} is sharded over")
    if vp is not None and vp.vocab_start is not None and vp.vocab_start != start:
        raise ValueError(f"vocab_parallel.vocab_start={vp.vocab_start} differs from the offset "
                         f"{start} of the DTensor {first}")
    return VocabParallel(group, start), out
