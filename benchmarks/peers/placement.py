"""Where llama.cpp keeps a MoE model's experts, for a GPU expert budget: the llama-bench flags
that hold a fraction `budget` of all experts on the GPU and compute the rest on the CPU.

llama.cpp stores each layer's experts as three merged tensors, `blk.L.ffn_{gate,up,down}_exps`
(`[E, ffn, hidden]` each), and places whole tensors: one expert alone cannot be put on the GPU.
So a budget is met in expert *bytes*, two ways:

- `ncmoe` (what users set): `--n-cpu-moe N` keeps the experts of the first N layers on the CPU,
  the other layers' experts on the GPU: a fraction (L - N) / L of them.
- `ot` (spread over layers): `-ot` patterns send the expert tensors that do not fit to the CPU,
  chosen so that every layer keeps about the same share of its three expert tensors on the GPU
  (a layer keeps 0-3 of them; round(3 L budget) in all), the closest llama.cpp comes to our
  cache's equal per-layer quotas of whole experts.

llama-bench reads `,` as a separator between test values and `;` between overrides of one test,
so a pattern holds neither; tensor names are matched with regex search.
"""

from __future__ import annotations

from dataclasses import dataclass

PROJECTIONS = ("down", "up", "gate")   # the order in which a layer's expert tensors stay on the GPU


@dataclass(frozen=True)
class Placement:
    """One llama-bench placement of the expert tensors. `gpu_tensors[l]`: how many of layer l's
    three expert tensors stay on the GPU; `args`: the llama-bench flags that make it so."""

    name: str                     # "ncmoe" | "ot"
    budget: float                 # the budget asked for (fraction of all experts)
    gpu_tensors: tuple[int, ...]  # per layer, 0..3
    args: tuple[str, ...]

    @property
    def gpu_fraction(self) -> float:
        """Fraction of all expert bytes on the GPU (the three tensors of a layer are equal in size)."""
        return sum(self.gpu_tensors) / (3 * len(self.gpu_tensors))


def _check(layers: int, budget: float) -> None:
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be a fraction of all experts in [0, 1], got {budget}")


def n_cpu_moe(layers: int, budget: float) -> int:
    """`--n-cpu-moe` for `budget`: the layers whose experts go to the CPU (the first ones)."""
    _check(layers, budget)
    return layers - round(budget * layers)


def ncmoe_placement(layers: int, budget: float) -> Placement:
    n = n_cpu_moe(layers, budget)
    return Placement("ncmoe", budget, tuple(0 if l < n else 3 for l in range(layers)), ("-ncmoe", str(n)))


def spread_counts(layers: int, budget: float) -> tuple[int, ...]:
    """round(3 L budget) expert tensors over L layers as evenly as possible (per-layer counts
    differ by at most one; the extra ones are spaced out, not bunched at the front)."""
    _check(layers, budget)
    total = round(3 * layers * budget)
    return tuple((l + 1) * total // layers - l * total // layers for l in range(layers))


def cpu_override(counts: tuple[int, ...]) -> str:
    """The `-ot` value that sends every expert tensor beyond each layer's count to the CPU:
    one `blk\\.(i|j)\\.ffn_P_exps=CPU` override per projection P, `;`-joined ("" if none)."""
    parts = []
    for k, proj in enumerate(PROJECTIONS):
        cpu_layers = [str(l) for l, c in enumerate(counts) if c <= k]
        if cpu_layers:
            parts.append(rf"blk\.({'|'.join(cpu_layers)})\.ffn_{proj}_exps=CPU")
    return ";".join(parts)


def ot_placement(layers: int, budget: float) -> Placement:
    counts = spread_counts(layers, budget)
    ot = cpu_override(counts)
    return Placement("ot", budget, counts, ("-ot", ot) if ot else ())


def placements(layers: int, budgets: tuple[float, ...], ways: tuple[str, ...] = ("ncmoe", "ot")) -> list[Placement]:
    """Every way x budget (the rows the target compares, first: a run cut short keeps them),
    then the two ends (all experts on the GPU, none) once as `ncmoe` rows."""
    make = {"ncmoe": ncmoe_placement, "ot": ot_placement}
    unknown = set(ways) - set(make)
    if unknown:
        raise ValueError(f"unknown placement(s) {sorted(unknown)}; known: {sorted(make)}")
    out = [make[w](layers, b) for b in budgets for w in ways]
    out += [ncmoe_placement(layers, 1.0), ncmoe_placement(layers, 0.0)]
    seen, unique = set(), []
    for p in out:                      # e.g. ot at a budget that is whole layers equals nothing new
        key = (p.name, p.gpu_tensors)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def gpu_tensor_names(counts: tuple[int, ...], names: list[str]) -> set[str]:
    """Of `names` (a GGUF's tensor names), the expert tensors that `counts` keeps on the GPU:
    what the `-ot` patterns leave alone. Used to check the patterns against real names."""
    import re

    patterns = [re.compile(p.split("=")[0]) for p in cpu_override(counts).split(";") if p]
    return {n for n in names if "_exps" in n and not any(p.search(n) for p in patterns)}
