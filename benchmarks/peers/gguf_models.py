"""Model B's shapes for llama.cpp: a random Mixtral-layout model written straight to GGUF.

Our B rows (benchmarks/decode.py) run Mixtral-8x7B's dimensions with random weights and int4
experts; llama.cpp gets the same dimensions here, its `llama` architecture with merged expert
tensors, every matrix at one llama.cpp type (Q4_0 by default: 4-bit values in blocks of 32 with
one fp16 scale, the format closest to our int4 with 128-wide groups; norms and routers F32).
Random weights are random bytes in that format: Q4_0/Q8_0 blocks with random codes and a fixed
scale, so no F16 file is written and quantized first (22.5 GB for 8 Mixtral layers at F16).
Timing does not depend on the values; the routers are normal(0, 0.5) as in our B rows, so each
token picks its own experts.

The tokenizer is a synthetic SentencePiece-style vocabulary (specials, the 256 byte tokens
llama.cpp looks up, then plain pieces): llama-bench feeds token ids and never tokenizes text.

    python3 benchmarks/peers/gguf_models.py OUT.gguf [--layers 8 --hidden 4096 ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers import llama_src  # noqa: E402

BYTE_TOKENS = 256
SPECIALS = ("<unk>", "<s>", "</s>")
TYPES = ("q4_0", "q8_0", "f16")


@dataclass(frozen=True)
class Shapes:
    """A Mixtral-layout model; defaults are model B's (decode.py --b-*)."""

    layers: int = 8
    hidden: int = 4096
    ffn: int = 14336
    heads: int = 32
    kv_heads: int = 8
    experts: int = 8
    top_k: int = 2
    vocab: int = 32000
    context: int = 4096
    rope_theta: float = 1e6
    router_std: float = 0.5

    def check(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden {self.hidden} / heads {self.heads} / kv_heads {self.kv_heads} do not divide")
        if self.hidden % 32 or self.ffn % 32:
            raise ValueError(f"hidden and ffn must be multiples of 32 (llama.cpp's block size): {self.hidden}, {self.ffn}")
        if self.vocab < len(SPECIALS) + BYTE_TOKENS + 1:
            raise ValueError(f"vocab must be > {len(SPECIALS) + BYTE_TOKENS} (specials and byte tokens), got {self.vocab}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k {self.top_k} not in 1..{self.experts}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...], bool]]:
        """(GGUF name, numpy shape [outer..., inner], is a matrix at the model's type) in file order."""
        D, F, E, V, hd = self.hidden, self.ffn, self.experts, self.vocab, self.head_dim
        yield "token_embd.weight", (V, D), True
        for l in range(self.layers):
            p = f"blk.{l}."
            yield p + "attn_norm.weight", (D,), False
            yield p + "attn_q.weight", (self.heads * hd, D), True
            yield p + "attn_k.weight", (self.kv_heads * hd, D), True
            yield p + "attn_v.weight", (self.kv_heads * hd, D), True
            yield p + "attn_output.weight", (D, self.heads * hd), True
            yield p + "ffn_norm.weight", (D,), False
            yield p + "ffn_gate_inp.weight", (E, D), False
            yield p + "ffn_gate_exps.weight", (E, F, D), True
            yield p + "ffn_up_exps.weight", (E, F, D), True
            yield p + "ffn_down_exps.weight", (E, D, F), True
        yield "output_norm.weight", (D,), False
        yield "output.weight", (V, D), True


def synthetic_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of an n-token SentencePiece-style vocabulary."""
    import gguf

    T = gguf.TokenType
    tokens = list(SPECIALS) + [f"<0x{b:02X}>" for b in range(BYTE_TOKENS)]
    types = [int(T.UNKNOWN), int(T.CONTROL), int(T.CONTROL)] + [int(T.BYTE)] * BYTE_TOKENS
    rest = n - len(tokens)
    tokens += [f"\u2581t{i}" for i in range(rest)]
    types += [int(T.NORMAL)] * rest
    scores = [0.0] * (n - rest) + [-float(i) for i in range(rest)]
    return tokens, scores, types


class RandomPool:
    """Random values of one llama.cpp type, tiled to any tensor: a pool of whole blocks
    (Q4_0: fp16 scale + 16 bytes of 4-bit codes; Q8_0: fp16 scale + 32 int8 codes) with the
    scale fixed so that the weights have about `std`, rolled by a random whole number of
    blocks per tensor so experts differ."""

    def __init__(self, kind: str, rng: np.random.Generator, std: float = 0.02, blocks: int = 1 << 18) -> None:
        import gguf

        self.kind, self.rng = kind, rng
        if kind == "f16":
            self.qtype, self.block, self.block_bytes = gguf.GGMLQuantizationType.F16, 1, 2
            self.pool = (rng.standard_normal(blocks * 32) * std).astype(np.float16).view(np.uint8)
            return
        self.qtype = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
        self.block, self.block_bytes = gguf.GGML_QUANT_SIZES[self.qtype]
        pool = rng.integers(0, 256, size=(blocks, self.block_bytes), dtype=np.uint8)
        # Q4_0 codes are 0..15 around 8 (uniform: std 4.6 steps); Q8_0 codes are int8 (uniform: 74)
        scale = std / (4.6 if kind == "q4_0" else 74.0)
        pool[:, :2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
        self.pool = pool.reshape(-1)

    def tensor(self, shape: tuple[int, ...]) -> np.ndarray:
        """uint8 bytes for a tensor of `shape` (inner dim a multiple of the block), shaped
        [outer..., inner / block * block_bytes] as gguf's writer takes quantized data."""
        inner = shape[-1]
        if inner % self.block:
            raise ValueError(f"inner dim {inner} is not a multiple of {self.kind}'s block of {self.block}")
        byte_shape = (*shape[:-1], inner // self.block * self.block_bytes)
        n = int(np.prod(byte_shape))
        shift = int(self.rng.integers(0, len(self.pool) // self.block_bytes)) * self.block_bytes
        return np.resize(np.roll(self.pool, shift), n).reshape(byte_shape)


def write_random_model(out: Path, shapes: Shapes, kind: str = "q4_0", seed: int = 0,
                       name: str = "mixtral-shape-b") -> dict[str, Any]:
    """Write `shapes` with random weights to `out` at llama.cpp type `kind`; returns what was
    written (shapes, type, bytes, the expert tensors' bytes, seconds)."""
    import gguf

    if kind not in TYPES:
        raise ValueError(f"type {kind!r} not one of {TYPES}")
    shapes.check()
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    pool = RandomPool(kind, rng)
    tokens, scores, types = synthetic_vocab(shapes.vocab)
    file_type = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "f16": gguf.LlamaFileType.MOSTLY_F16}[kind]

    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(name)
    w.add_block_count(shapes.layers)
    w.add_context_length(shapes.context)
    w.add_embedding_length(shapes.hidden)
    w.add_feed_forward_length(shapes.ffn)
    w.add_head_count(shapes.heads)
    w.add_head_count_kv(shapes.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(shapes.rope_theta)
    w.add_rope_dimension_count(shapes.head_dim)
    w.add_expert_count(shapes.experts)
    w.add_expert_used_count(shapes.top_k)
    w.add_vocab_size(shapes.vocab)
    w.add_file_type(int(file_type))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    # tensor infos first, then the data one tensor at a time (8 Mixtral layers are 6.3 GB at Q4_0)
    plan = list(shapes.tensors())
    for tname, shape, matrix in plan:
        if matrix:
            byte_shape = (*shape[:-1], shape[-1] // pool.block * pool.block_bytes)
            w.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=pool.qtype)
        else:
            w.add_tensor_info(tname, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = expert_bytes = 0
    for tname, shape, matrix in plan:
        if matrix:
            data = pool.tensor(shape)
        elif tname.endswith("ffn_gate_inp.weight"):
            data = (rng.standard_normal(shape) * shapes.router_std).astype(np.float32)
        else:
            data = np.ones(shape, dtype=np.float32)
        w.write_tensor_data(data)
        total += data.nbytes
        if "_exps" in tname:
            expert_bytes += data.nbytes
    w.close()
    return {"path": str(out), "type": kind, "shapes": asdict(shapes), "bytes": total,
            "expert_bytes": expert_bytes, "expert_bytes_per_expert": expert_bytes // (shapes.layers * shapes.experts),
            "seed": seed, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--type", default="q4_0", choices=TYPES)
    p.add_argument("--seed", type=int, default=0)
    for f, v in asdict(Shapes()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    a = p.parse_args(argv)
    llama_src.use_gguf_py()
    shapes = Shapes(**{f: getattr(a, f) for f in asdict(Shapes())})
    info = write_random_model(a.out, shapes, a.type, a.seed)
    print(f"wrote {info['path']}: {info['bytes'] / 1e9:.2f} GB ({info['type']}), {info['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
