"""Top-k routing in one kernel: softmax over the router's logits, the k largest, their weights
(renormalised to sum 1, or the softmax probabilities as they are); for the decode step also
inactive rows routed nowhere. On CUDA the eager forward routes through it too (`topk`).

    p = softmax(logits[t])                          (float32)
    ids[t] = the k largest p, largest first (lowest expert on a tie), or -1 for an inactive row
    w[t] = p[ids] / sum(p[ids])   (renormalise)  |  p[ids]   (else);  0 for an inactive row
    pend[t] = -1                                    (no dropped weight: top-k keeps every choice)

The torch way (`routing.topk_route`, then the active mask and the step's copies into its
buffers) is about ten kernels per layer; in a captured step of tiny batches each costs its
launch slot in the graph, so the step uses this one (a program per row) where Triton runs.
"""

from __future__ import annotations

import torch

from decoder.kernels.lazy import runs_on, triton_kernel


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def route_topk_rows(logits_ptr, active_ptr, w_ptr, ids_ptr, pend_ptr, E, K: tl.constexpr,
                        RENORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                        STEP: tl.constexpr = True):
        t = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        m = e < E
        z = tl.load(logits_ptr + t * E + e, mask=m, other=float("-inf")).to(tl.float32)
        z = z - tl.max(z, axis=0)
        p = tl.where(m, tl.exp(z), 0.0)
        p = p / tl.sum(p, axis=0)
        left = tl.where(m, p, -1.0)
        kk = tl.arange(0, BLOCK_K)
        sel_w = tl.zeros((BLOCK_K,), dtype=tl.float32)
        sel_i = tl.zeros((BLOCK_K,), dtype=tl.int64)
        for j in tl.static_range(K):
            best = tl.max(left, axis=0)
            idx = tl.min(tl.where(left == best, e, BLOCK_E), axis=0)
            sel_w = tl.where(kk == j, best, sel_w)
            sel_i = tl.where(kk == j, idx.to(tl.int64), sel_i)
            left = tl.where(e == idx, -1.0, left)
        if RENORM:
            sel_w = sel_w / tl.sum(sel_w, axis=0)
        if STEP:                  # the decode step's rows: padding rows route nowhere, no drops
            live = tl.load(active_ptr + t) != 0
            sel_w = tl.where(live, sel_w, 0.0)
            sel_i = tl.where(live, sel_i, -1)
            tl.store(pend_ptr + t, -1.0)
        km = kk < K
        tl.store(w_ptr + t * K + kk, sel_w, mask=km)
        tl.store(ids_ptr + t * K + kk, sel_i, mask=km)

    return route_topk_rows


def available(x: torch.Tensor) -> bool:
    """Whether the kernel runs for router logits like `x`."""
    return runs_on(x, _kernel)


def _launch(logits: torch.Tensor, k: int, renormalize: bool, w: torch.Tensor, ids: torch.Tensor,
            active: torch.Tensor | None = None, pend: torch.Tensor | None = None) -> None:
    # with `active` (and `pend`): the decode step's rows; without: every row routed, no pend
    import triton

    T, E = logits.shape
    step = active is not None
    _kernel()[(T,)](logits.contiguous(), active.view(torch.uint8) if step else w, w, ids, pend if step else w, E,
                    K=k, RENORM=bool(renormalize), BLOCK_E=triton.next_power_of_2(E),
                    BLOCK_K=triton.next_power_of_2(k), STEP=step, num_warps=1)


def topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`routing.topk_route` through the kernel: logits [T, E] -> weights [T, k] float32, ids
    [T, k] int64. On CUDA every path routes with it (`topk_route`), so the decode step and the
    eager forward pick the same experts where two router logits tie."""
    T = logits.shape[0]
    w = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, k, dtype=torch.int64, device=logits.device)
    if T:
        _launch(logits, k, renormalize, w, ids)
    return w, ids


def route_topk(logits: torch.Tensor, active: torch.Tensor, k: int, renormalize: bool, w_out: torch.Tensor,
               ids_out: torch.Tensor, pend_out: torch.Tensor) -> None:
    """logits [T, E]; active [T] bool -> w_out [T, k] float32, ids_out [T, k] int64, pend_out
    [T] float32 (-1), written in place (contiguous)."""
    if not available(logits):
        from decoder.routing import topk_route

        w, ids = topk_route(logits, k, renormalize)
        live = active[:, None]
        w_out.copy_(torch.where(live, w, 0.0))
        ids_out.copy_(torch.where(live, ids, -1))
        pend_out.fill_(-1.0)
        return
    _launch(logits, k, renormalize, w_out, ids_out, active, pend_out)
