"""The decode step's whole-token routing counters in one kernel, a program per layer:

    counts[l] += [active rows, experts used by active rows, active rows using one expert,
                  sum of W^2 over active rows that dropped weight W (pend >= 0),
                  distinct experts looked up]
    loads[l, e] += uses of expert e

from ids [L, B, k] (-1 = none), pend [L, B] and active [B]. The torch way (`_count_torch`) is
about twenty kernels per token; in a captured step each costs its launch slot in the graph.
"""

from __future__ import annotations

import torch

from decoder.kernels.lazy import runs_on, triton_kernel


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def count_layers(ids_ptr, pend_ptr, active_ptr, counts_ptr, loads_ptr, B, E, K: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
        l = tl.program_id(0)
        b = tl.arange(0, BLOCK_B)
        j = tl.arange(0, BLOCK_K)
        bm = b < B
        ids = tl.load(ids_ptr + (l * B + b[:, None]) * K + j[None, :], mask=bm[:, None] & (j[None, :] < K), other=-1)
        valid = ids >= 0                                                   # [BLOCK_B, BLOCK_K]
        n = tl.sum(valid.to(tl.int32), axis=1)                             # experts per row
        act = tl.load(active_ptr + b, mask=bm, other=0) != 0
        pend = tl.load(pend_ptr + l * B + b, mask=bm, other=-1.0)
        dropped = (pend >= 0) & act
        decisions = tl.sum(act.to(tl.float64), axis=0)
        used = tl.sum(tl.where(act, n, 0).to(tl.float64), axis=0)
        single = tl.sum(((n == 1) & act).to(tl.float64), axis=0)
        w2 = tl.sum(tl.where(dropped, pend * pend, 0.0), axis=0).to(tl.float64)        # summed in fp32, as torch does
        e = tl.arange(0, BLOCK_E)
        hits = (ids[:, :, None] == e[None, None, :]) & valid[:, :, None]  # [BLOCK_B, BLOCK_K, BLOCK_E]
        per_e = tl.sum(tl.sum(hits.to(tl.int64), axis=1), axis=0)          # [BLOCK_E]
        em = e < E
        uniq = tl.sum(((per_e > 0) & em).to(tl.float64), axis=0)
        loads = loads_ptr + l * E + e
        tl.store(loads, tl.load(loads, mask=em, other=0) + per_e, mask=em)
        c = counts_ptr + l * 5
        tl.store(c, tl.load(c) + decisions)
        tl.store(c + 1, tl.load(c + 1) + used)
        tl.store(c + 2, tl.load(c + 2) + single)
        tl.store(c + 3, tl.load(c + 3) + w2)
        tl.store(c + 4, tl.load(c + 4) + uniq)

    return count_layers


def count_routing(ids: torch.Tensor, pend: torch.Tensor, active: torch.Tensor, counts: torch.Tensor,
                  loads: torch.Tensor) -> None:
    """ids [L, B, k] int64; pend [L, B] float32; active [B] bool; counts [L, 5] float64 and
    loads [L, E] int64 are added to in place (all contiguous)."""
    kernel = _kernel() if runs_on(ids, _kernel) else None
    if kernel is None:
        _count_torch(ids, pend, active, counts, loads)
        return
    import triton

    L, B, k = ids.shape
    E = loads.shape[1]
    kernel[(L,)](ids, pend, active.view(torch.uint8), counts, loads, B, E, K=k,
                 BLOCK_B=triton.next_power_of_2(B), BLOCK_K=triton.next_power_of_2(k),
                 BLOCK_E=triton.next_power_of_2(E), num_warps=1)


def _count_torch(ids: torch.Tensor, pend: torch.Tensor, act: torch.Tensor, counts: torch.Tensor,
                 loads: torch.Tensor) -> None:
    L, E = loads.shape
    valid = ids >= 0
    n = valid.sum(2)                                                       # [L, B]
    dropped = (pend >= 0) & act
    onehot = torch.zeros(L, E, dtype=torch.long, device=ids.device)
    onehot.scatter_add_(1, ids.clamp(min=0).view(L, -1), valid.view(L, -1).long())
    c = torch.stack([act.sum().expand(L), (n * act).sum(1), ((n == 1) & act).sum(1),
                     torch.where(dropped, pend * pend, 0.0).sum(1), (onehot > 0).sum(1)], dim=1).double()
    counts += c
    loads += onehot
