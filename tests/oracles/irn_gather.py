"""IRN's ``to_affinity`` as upstream computes it (``irn:net/resnet50_irn.py:162-175``): gather
every path cell of every pair (``path_indices``), then a max over the path axis — the slow
restatement that ``wsss_fast.train.affinity.path_max_affinity`` (the fused op) must equal."""

from __future__ import annotations

import torch

from wsss_fast.ops import irn_path_set


def gather_path_max_affinity(edge: torch.Tensor, radius: int = 10) -> torch.Tensor:
    """``(B, h, w)`` boundary map → ``(B, O, S)`` affinities ``1 − max_path``, IRN's order."""
    b, h, w = edge.shape
    paths = irn_path_set(radius)
    src, _ = paths.pair_indices(h, w, device=edge.device)
    cells, _ = paths.cell_tables(device=edge.device)
    table = src[None] + (cells[:, 0].long() * w + cells[:, 1].long())[:, None]
    gathered = edge.reshape(b, -1)[:, table.reshape(-1)].view(b, *table.shape)
    out, first = [], 0
    for length in paths.path_lengths:   # offsets in path order: consecutive cell runs
        out.append(gathered[:, first: first + length].amax(dim=1))
        first += length
    if not out:
        return edge.new_zeros((b, 0, src.numel()))
    return 1 - torch.stack(out, dim=1)
