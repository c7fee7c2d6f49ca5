"""tail_directions stays finite and exact where the dropped weight is tiny or zero.

A random router in float32 gives some tokens a tail weight of ~1e-38; v = dy / W computed by
division multiplied dy's rounding error by 1e38 and the sensitivity overflowed to inf (the
profile was then refused). v is built from weighted means instead; these checks hold it to the
float64 quotient where that is well conditioned, and finite where it is not."""

from types import SimpleNamespace

import torch

from decoder.calibrate import tail_directions


def _moe(renormalize, scores="softmax", scaling=1.0):
    """The three MoEBlock attributes tail_directions reads."""
    return SimpleNamespace(renormalize=renormalize, scores=scores, scaling=scaling)


def _quotient(w, y, m, renormalize):
    w, y = w.double(), y.double()
    k = w.shape[1]
    kept, total = w[:, :k - m], w.sum(1)
    dy = -(w[:, k - m:, None] * y[:, k - m:]).sum(1)
    if renormalize:
        dy = dy + (kept[..., None] * y[:, :k - m]).sum(1) * (total / kept.sum(1) - 1)[:, None]
    return dy / (w[:, k - m:].sum(1) / total)[:, None]


def test_tail_directions_equal_dy_over_w_and_stay_finite_for_tiny_tails():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([[0.6, 0.25, 0.15], [1.0, 6e-39, 0.0], [0.5, 0.5, 0.0], [0.4, 0.3, 0.3]])
    y = torch.randn(4, 3, 16, generator=g) * 10
    for renormalize in (True, False):
        v, W = tail_directions(w, y, _moe(renormalize))                      # [4, 2, 16], [4, 2]
        assert torch.isfinite(v).all() and torch.isfinite(W).all()
        assert v.abs().max() <= 3 * y.abs().max() * w.sum(1).max()   # bounded by the outputs
        for m in (1, 2):
            ref = _quotient(w, y, m, renormalize)
            for s in (0, 3):                                           # well-conditioned rows
                torch.testing.assert_close(v[s, m - 1].double(), ref[s], rtol=1e-5, atol=1e-5)
        # row 1, m=1: the tail is 0.0 exactly (no limit): its plain mean; m=2: the tiny weight
        # alone is the tail, so ybar_D is that expert's output whatever its size
        want = -y[1, 1] if not renormalize else (y[1, 0] - y[1, 1])
        torch.testing.assert_close(v[1, 1], want, rtol=1e-5, atol=1e-5)
        assert W[1, 0] == 0 and 0 < W[1, 1] < 1e-37


def test_sensitivity_contribution_does_not_overflow_on_a_subnormal_tail():
    w = torch.tensor([[1.0, 6e-39]])
    y = torch.tensor([[[12.5, -3.0, 7.0]], [[0.0, 0.0, 0.0]]]).reshape(1, 2, 3)
    g = torch.tensor([[1e3, 1e3, 1e3]])
    v, _ = tail_directions(w, y, _moe(True))
    contrib = 0.5 * torch.einsum("sh,smh->sm", g, v) ** 2
    assert torch.isfinite(contrib).all()


def test_tail_directions_of_a_scaled_sigmoid_router_divide_out_its_scaling():
    """DeepSeek-V3 without renormalisation: applied weights = 2.5 x scores, the gating decides on
    the scores, so v = dy / (T_D / 2.5) = -2.5 ybar_D."""
    g = torch.Generator().manual_seed(1)
    scores = torch.tensor([[0.9, 0.5, 0.2, 0.1], [0.7, 0.6, 1e-39, 0.0]])
    w = 2.5 * scores
    y = torch.randn(2, 4, 8, generator=g)
    v, W = tail_directions(w, y, _moe(False, "sigmoid", 2.5))
    assert torch.isfinite(v).all()
    torch.testing.assert_close(W[0], torch.tensor([0.1, 0.3, 0.8]), rtol=1e-6, atol=1e-6)
    for m in (1, 2, 3):
        dy = -(w[0, 4 - m:, None].double() * y[0, 4 - m:].double()).sum(0)
        torch.testing.assert_close(v[0, m - 1].double(), dy / W[0, m - 1].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v[1, 1], -2.5 * y[1, 2], rtol=1e-6, atol=1e-6)   # the subnormal tail alone
