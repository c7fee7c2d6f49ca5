"""Engine: a Mixtral-family model whose dense part and experts come from an expert store.

    engine = Engine.from_store("grpc://127.0.0.1:50051", "tiny", gating="topk")
    engine.forward_logits([1, 5, 9])             # float32 [seq, vocab]
    engine.generate("Once upon", max_tokens=32)  # GenerationResult(text, token_ids, ...)
    engine.stats()                               # tokens/s, experts/token, hit rates, bytes ...

The engine wires: StoreClient -> ExpertSource -> an ExpertProvider (StoreExperts, or the
AdapMoE cache of decoder/experts/cache.py when cache budgets are given) -> Transformer, plus
a Gating (decoder/gating.py for anything but "topk") and MoE observers (the engine's own
routing statistics; the prefetcher).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import safetensors.torch
import torch

from decoder.experts.cache import ExpertCache, build_provider as build_cache_provider
from decoder.experts.host_compute import MissTokens
from decoder.experts.prefetch import Prefetcher, build_prefetcher
from decoder.experts.provider import ExpertProvider, ExpertSource, StoreExperts
from decoder.model.config import ModelConfig
from decoder.model.transformer import Transformer
from decoder.gating import make_gating
from decoder.routing import Gating, MoEObserver, TopKGating
from decoder.step import DecodeStep, step_gating_key, unsupported_reason
from decoder.tokenizer import StreamDecoder, Tokenizer
from expert_store.client import StoreClient
from expert_store.manifest import Manifest

log = logging.getLogger(__name__)

TokenCallback = Callable[[str, int], None]
DECODE_STEPS = ("auto", "step", "eager")


@dataclass
class GenerationResult:
    text: str                      # generated text (stop string excluded)
    token_ids: list[int]           # generated ids (an EOS, when hit, included as its last id)
    prompt_tokens: int
    finish_reason: str             # "length" | "stop" | "eos"
    seconds: float                 # prefill + decode
    prefill_s: float
    decode_s: float

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class RoutingStats(MoEObserver):
    """Counts routing decisions per phase ("prefill", "decode", "score"): experts per token,
    single-expert decisions, and per-(layer, expert) loads. Counts on the host from the
    decision the MoE block reads anyway (on_routing_host): no kernel, no sync of its own."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.L, self.E = num_layers, num_experts
        self.phase = "score"
        self.reset()

    def reset(self) -> None:
        self.decisions: dict[str, int] = {}              # (token, layer) routing decisions
        self._used: dict[str, int] = {}                  # experts used, per phase
        self._single: dict[str, int] = {}                # single-expert decisions, per phase
        self._loads = [[0] * self.E for _ in range(self.L)]  # [L][E]

    def on_routing_host(self, layer: int, rows: list[list[int]]) -> None:
        p = self.phase
        used = single = 0
        loads = self._loads[layer]
        for row in rows:                                     # [k] expert ids, -1 = none
            n = 0
            for e in row:
                if e >= 0:
                    loads[e] += 1
                    n += 1
            used += n
            single += n == 1
        self.decisions[p] = self.decisions.get(p, 0) + len(rows)
        self._used[p] = self._used.get(p, 0) + used
        self._single[p] = self._single.get(p, 0) + single

    def add_counts(self, layer: int, decisions: int, used: int, single: int, loads: list[int]) -> None:
        """Counts of `layer` the captured decode step accumulated on the device (current phase)."""
        p = self.phase
        self.decisions[p] = self.decisions.get(p, 0) + decisions
        self._used[p] = self._used.get(p, 0) + used
        self._single[p] = self._single.get(p, 0) + single
        row = self._loads[layer]
        for e, n in enumerate(loads):
            row[e] += n

    @property
    def loads(self) -> torch.Tensor:
        """[L, E] routing decisions per expert (all phases)."""
        return torch.tensor(self._loads, dtype=torch.int64)

    def summary(self, phase: str | None = None) -> dict[str, float]:
        phases = [phase] if phase else list(self.decisions)
        d = sum(self.decisions.get(p, 0) for p in phases)
        u = sum(self._used.get(p, 0) for p in phases)
        s = sum(self._single.get(p, 0) for p in phases)
        return {"decisions": d,
                "experts_per_token": (u / d) if d else 0.0,
                "single_expert_ratio": (s / d) if d else 0.0}


@dataclass
class _Counters:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    requests: int = 0
    scored_tokens: int = 0


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, *, model_name: str = "",
                 provider: ExpertProvider | None = None, client: StoreClient | None = None, owns_client: bool = False,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 precision: str = "bf16", prefetchers: Sequence[Prefetcher] = (),
                 decode_step: str = "auto") -> None:
        if decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step must be one of {DECODE_STEPS}, got {decode_step!r}")
        model.fuse_qkv()
        self.model = model
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.provider = provider if provider is not None else model.experts
        self.client = client
        self._owns_client = owns_client
        self.device = torch.device(device)
        self.dtype = dtype
        self.precision = precision
        self.prefetchers = list(prefetchers)   # attached to the model as observers; stats, reset, close here
        self.routing = RoutingStats(self.config.num_hidden_layers, self.config.num_local_experts)
        model.add_observer(self.routing)
        self._counters = _Counters()
        # "auto": the GPU-driven step (decoder/step.py) on CUDA when the model supports it;
        # "step": always (eagerly on the CPU; an error when unsupported); "eager": never
        self.decode_step = decode_step
        self._steps: dict[int, DecodeStep] = {}     # batch size -> step (1: generate())
        self._verdict: tuple[Any, str | None] | None = None   # (what it depends on, unsupported_reason)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_store(cls, store: StoreClient | str, model: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, gating: str | Gating = "topk",
                   gpu_cache_bytes: int | None = None, host_cache_bytes: int | None = None,
                   precision: str = "bf16", budget: float | None = None, prefetch: bool | None = None,
                   cache_options: dict[str, Any] | None = None, gating_options: dict[str, Any] | None = None,
                   prefetch_options: dict[str, Any] | None = None, decode_step: str = "auto") -> "Engine":
        """Build an engine for `model` from a StoreClient or a store target (dir or address).

        Raises expert_store.errors.StoreError (NotFound for an unknown model, Unavailable when
        the store is down) or ValueError (not a Mixtral checkpoint, bad precision/gating).
        gpu_cache_bytes / host_cache_bytes: budgets of the AdapMoE expert cache
        (decoder/experts/cache.py); without them every fetched expert stays decoded in memory.
        budget: the gating budget T (adaptive / cost-aware gating). prefetch: None = attach the
        prefetcher when the provider supports it. decode_step: "auto" | "step" | "eager" (see
        Engine). *_options go verbatim to the builders below.
        """
        owns = isinstance(store, str)
        client = StoreClient.open(store) if owns else store
        provider = None
        try:
            device = torch.device(device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError("device cuda requested but CUDA is not available")
            manifest = client.manifest(model)
            config = ModelConfig.from_hf(manifest.config)
            source = ExpertSource(client=client, model=model, config=config, manifest=manifest,
                                  precision=precision, device=device, dtype=dtype)
            provider = _build_provider(source, gpu_cache_bytes, host_cache_bytes, cache_options or {})
            with torch.device("meta"):
                net = Transformer(config, experts=provider)
            net = net.to_empty(device=device).to(dtype)
            if config.tie_word_embeddings:
                net.lm_head.weight = net.embed_tokens.weight
            dense = safetensors.torch.load(bytes(client.fetch_dense(model)))
            net.load_hf_state_dict(dense)
            net.eval()
            tok_json = manifest.tokenizer_json
            tokenizer = Tokenizer.from_bytes(tok_json, config.bos_token_id, config.eos_token_ids) if tok_json else None
            net.gating = _build_gating(gating, config, provider, budget, manifest, gating_options or {})
            if isinstance(provider, ExpertCache) and provider.host_experts is not None:
                net.add_observer(MissTokens(provider))    # tokens per expert: misses the host may compute
            prefetchers = _build_prefetcher(net, provider, source, prefetch, prefetch_options or {})
            return cls(net, tokenizer, model_name=model, provider=provider, client=client, owns_client=owns,
                       device=device, dtype=dtype, precision=precision, prefetchers=prefetchers,
                       decode_step=decode_step)
        except BaseException:
            if provider is not None:   # its loader threads / fetch processes / pinned memory
                try:
                    provider.close()
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    log.debug("closing the provider after a failed build", exc_info=True)
            if owns:
                client.close()
            raise

    @classmethod
    def from_model(cls, model: Transformer, tokenizer: Tokenizer | None = None, **kw: Any) -> "Engine":
        """Wrap an in-memory Transformer (e.g. ResidentExperts just trained)."""
        p = next(model.parameters())
        kw.setdefault("device", p.device)
        kw.setdefault("dtype", p.dtype)
        kw.setdefault("precision", "resident")
        return cls(model, tokenizer, **kw)

    # --- inference ----------------------------------------------------------------------------
    def _ids(self, input_ids: Any) -> torch.Tensor:
        if isinstance(input_ids, str):
            input_ids = self.encode(input_ids)
        ids = torch.as_tensor(input_ids, dtype=torch.long).flatten().to(self.device)
        if ids.numel() == 0:
            raise ValueError("empty input")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        return ids

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"model {self.model_name!r} has no tokenizer: pass token ids")
        return self.tokenizer.encode(text)

    @torch.inference_mode()
    def forward_logits(self, input_ids: Any) -> torch.Tensor:
        """Logits of one sequence (ids or text), full forward without KV cache: float32 [seq, vocab]."""
        ids = self._ids(input_ids)
        self._check_context(ids.numel(), 0)
        self.routing.phase = "score"
        self.provider.begin_token()
        logits = self.model(ids[None])[0].float()
        self._counters.scored_tokens += ids.numel()
        return logits

    @torch.inference_mode()
    def decode_logits(self, input_ids: Any) -> torch.Tensor:
        """Teacher-forced logits of one sequence computed the way generate() decodes: one token
        per forward step through the static KV cache (routing phase "decode"), so gating, cache
        and prefetcher see one-token steps. float32 [seq, vocab]; row i predicts token i+1."""
        ids = self._ids(input_ids)
        n = ids.numel()
        self._check_context(n, 0)
        self._setup_caches(n)
        self.routing.phase = "decode"
        rows = []
        t0 = time.perf_counter()
        for i in range(n):
            self.provider.begin_token()
            rows.append(self._decode_one(ids[i:i + 1], i).float().clone())
        self._counters.decode_s += time.perf_counter() - t0
        self._counters.decode_steps += n
        self._counters.scored_tokens += n
        return torch.stack(rows)

    def _check_context(self, n_prompt: int, n_new: int) -> None:
        ctx = self.config.max_position_embeddings
        if n_prompt > ctx:
            raise ValueError(f"prompt has {n_prompt} tokens, longer than the model's context of {ctx} tokens")

    @torch.inference_mode()
    def generate(self, prompt: str | Sequence[int], max_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] | None = None,
                 on_token: TokenCallback | None = None, stop_at_eos: bool = True) -> GenerationResult:
        """Prefill the prompt, then decode one token at a time with the static KV cache.

        temperature 0 = greedy (argmax); otherwise softmax(logits / T) restricted to the top-p
        nucleus (top_p in (0, 1]; 1 = off), sampled with a torch.Generator seeded by `seed`.
        Finishes at max_tokens ("length"), at an EOS id ("eos"), at the context limit
        ("length"), or when the text contains a stop string ("stop"; the text is cut before it).
        on_token(text_delta, token_id) is called once per generated token; text that might
        begin a stop string or an unfinished UTF-8 character is held back and emitted with a
        later token (the last call flushes everything).
        """
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError("temperature must be >= 0")
        if not 0 < top_p <= 1 and top_p != 0:
            raise ValueError("top_p must be in (0, 1]")
        stops = [s for s in (stop or []) if s]
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        ids = self._ids(prompt)
        n_prompt = ids.numel()
        self._check_context(n_prompt, max_tokens)
        ctx = self.config.max_position_embeddings
        max_new = min(max_tokens, ctx - n_prompt + 1)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else int.from_bytes(__import__("os").urandom(8), "little") >> 1)
        stream = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
        emitted = ""
        out_ids: list[int] = []
        finish = "length"
        text = ""

        self._counters.requests += 1
        self._counters.prompt_tokens += n_prompt
        t0 = time.perf_counter()
        prefill_s = decode_s = 0.0
        if max_new > 0:
            self._setup_caches(min(ctx, n_prompt + max_new))
            self.routing.phase = "prefill"
            self.provider.begin_token()
            logits = self.model(ids[None], torch.arange(n_prompt, device=self.device), last_only=True)[0, -1]
            prefill_s = time.perf_counter() - t0
            self._counters.prefill_s += prefill_s
            self.routing.phase = "decode"
            pos = n_prompt
            while True:
                tok = self._sample(logits, temperature, top_p, gen)
                out_ids.append(tok)
                self._counters.generated_tokens += 1
                done = None
                if stop_at_eos and tok in self.config.eos_token_ids:
                    done = "eos"
                elif len(out_ids) >= max_new:
                    done = "length"
                delta = ""
                if stream is not None:
                    stream.ids.append(tok)
                    full = stream.full_text()
                    if stops:
                        cut = _find_stop(full, stops, max(0, len(emitted) - max(map(len, stops))))
                        if cut is not None:
                            full, done = full[:cut], "stop"
                    text = full
                    safe = len(full) if done else _safe_len(full, stops)
                    if safe > len(emitted) and full.startswith(emitted):
                        delta, emitted = full[len(emitted):safe], full[:safe]
                if on_token is not None:
                    on_token(delta, tok)
                if done:
                    finish = done
                    break
                t1 = time.perf_counter()
                self.provider.begin_token()
                logits = self._decode_one(torch.tensor([tok]), pos)
                pos += 1
                self._counters.decode_steps += 1
                decode_s += time.perf_counter() - t1
            self._counters.decode_s += decode_s
        seconds = time.perf_counter() - t0
        if stream is None:
            text = ""
        return GenerationResult(text=text, token_ids=out_ids, prompt_tokens=n_prompt, finish_reason=finish,
                                seconds=seconds, prefill_s=prefill_s, decode_s=decode_s)

    # --- the decode step ------------------------------------------------------------------------
    def _use_step(self) -> bool:
        """Whether this decode token goes through the step. Asked every token: the model's
        verdict is kept until its gating, observers or provider change."""
        if self.decode_step == "eager" or (self.decode_step == "auto" and self.device.type != "cuda"):
            return False
        m = self.model
        key = (m.gating, step_gating_key(m.gating), tuple(m.observers), m.experts)
        if self._verdict is None or self._verdict[0] != key:
            self._verdict = (key, unsupported_reason(m))
        reason = self._verdict[1]
        if reason is not None and self.decode_step == "step":
            raise ValueError(f"decode_step='step': {reason}")
        return reason is None

    def _setup_caches(self, n: int) -> None:
        """KV caches for a sequence of n tokens; with the decode step, rounded up to a power of
        two (at least 256, at most the context) so that its graphs outlive one request."""
        if self._use_step():
            n = min(self.config.max_position_embeddings, max(256, 1 << max(0, n - 1).bit_length()))
        self.model.setup_caches(1, n)

    @property
    def _step(self) -> DecodeStep | None:
        """The batch-1 step generate() and decode_logits() use (None until built)."""
        return self._steps.get(1)

    @_step.setter
    def _step(self, step: DecodeStep | None) -> None:
        if step is None:
            self._steps.pop(1, None)
        else:
            self._steps[1] = step

    def decode_step_for(self, batch: int) -> DecodeStep | None:
        """The decode step for `batch` rows over the model's KV cache (rows 0..batch-1), built
        (and its graphs captured) on first use and rebuilt when the model changed under it;
        None when this engine decodes eagerly."""
        if not self._use_step():
            return None
        st = self._steps.get(batch)
        if st is None or st.stale():
            if st is not None:
                st.flush_counts(self.routing)
            st = self._steps[batch] = DecodeStep(self.model, batch=batch)
        return st

    def _decode_one(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [V] of one token (tok: [1] ids) at position `pos` through the KV cache."""
        if not self._use_step():
            logits = self.model(tok.reshape(1, 1).to(self.device), torch.tensor([pos], device=self.device))[0, -1]
        else:
            st = self.decode_step_for(1)
            logits = st.run(tok.reshape(1), torch.tensor([pos]))[0]
        if self.device.type == "cuda":
            # the step's time is the GPU's: wait for it here, inside the timed decode step (the
            # sampling read would wait anyway, but outside decode_s, flattering a queued step)
            torch.cuda.current_stream(self.device).synchronize()
        return logits

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
        # logits: [V]
        if temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if 0 < top_p < 1:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p    # smallest prefix reaching top_p
            keep[0] = True
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=gen))

    # --- statistics ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        for st in self._steps.values():
            st.flush_counts(self.routing)
        c = self._counters
        allp = self.routing.summary()
        pstats = self.provider.stats() or {}
        tokens = max(1, c.generated_tokens + c.scored_tokens)
        tiers = {}
        for name, t in (pstats.get("tiers") or {}).items():
            t = dict(t)
            lookups = t.get("hits", 0) + t.get("misses", 0)
            t.setdefault("hit_rate", (t.get("hits", 0) / lookups) if lookups else 0.0)
            if "bytes" in t:  # bytes moved into this tier
                t.setdefault("bytes_per_token", t["bytes"] / tokens)
            tiers[name] = t
        steps = c.decode_steps + c.requests  # forward steps that produced a token
        bytes_fetched = int(pstats.get("bytes_fetched", 0))
        out: dict[str, Any] = {
            "model": self.model_name,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "precision": self.precision,
            "gating": getattr(self.model.gating, "name", type(self.model.gating).__name__),
            "requests": c.requests,
            "prompt_tokens": c.prompt_tokens,
            "generated_tokens": c.generated_tokens,
            "scored_tokens": c.scored_tokens,
            "prefill_s": c.prefill_s,
            "decode_s": c.decode_s,
            "prefill_tokens_per_s": (c.prompt_tokens / c.prefill_s) if c.prefill_s else 0.0,
            # decode throughput: tokens produced by decode steps / time in decode steps
            "tokens_per_s": (c.decode_steps / c.decode_s) if c.decode_s else 0.0,
            # over every routing decision (prefill, scoring and decode), as gating_stats counts
            # them: one name, one scope; "routing" splits them by phase
            "experts_per_token": allp["experts_per_token"],
            "single_expert_ratio": allp["single_expert_ratio"],
            "routing": {p: self.routing.summary(p) for p in self.routing.decisions},
            "expert_loads": self.routing.loads.tolist(),
            "bytes_fetched": bytes_fetched,
            "bytes_fetched_per_token": bytes_fetched / tokens,
            "fetches": int(pstats.get("fetches", 0)),
            "stall_s": float(pstats.get("stall_s", 0.0)),
            "stall_s_per_token": float(pstats.get("stall_s", 0.0)) / max(1, steps),
            "tiers": tiers,
            "provider": pstats,
        }
        gstats = self.model.gating.stats()
        if gstats:
            out["gating_stats"] = gstats
        for pf in self.prefetchers:
            out[pf.stats_name] = pf.stats()
        return out

    def reset_stats(self) -> None:
        for st in self._steps.values():
            st.flush_counts()           # drop what they counted so far
        self._counters = _Counters()
        self.routing.reset()
        self.provider.reset_stats()
        self.model.gating.reset_stats()
        for pf in self.prefetchers:
            pf.reset_stats()

    def close(self) -> None:
        for pf in self.prefetchers:
            pf.close()
        self.provider.close()
        self.model.clear_caches()
        if self._owns_client and self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --- helpers ------------------------------------------------------------------------------------
def _find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    best = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _safe_len(text: str, stops: Sequence[str]) -> int:
    """Length of the prefix of `text` that can be emitted: no trailing partial UTF-8 char and
    no suffix that could be the beginning of a stop string."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[n - k:n] == s[:k]:
                hold = max(hold, k)
                break
    return n - hold


def _build_provider(source: ExpertSource, gpu_cache_bytes: int | None, host_cache_bytes: int | None,
                    options: dict[str, Any]) -> ExpertProvider:
    """StoreExperts when no cache budget is given; otherwise the AdapMoE cache
    (decoder.experts.cache.build_provider(source, gpu_cache_bytes=, host_cache_bytes=, **options))."""
    if gpu_cache_bytes is None and host_cache_bytes is None:
        return StoreExperts(source)
    for name, v in (("gpu_cache_bytes", gpu_cache_bytes), ("host_cache_bytes", host_cache_bytes)):
        if v is not None and v < 0:
            raise ValueError(f"{name} must be >= 0")
    return build_cache_provider(source, gpu_cache_bytes=gpu_cache_bytes, host_cache_bytes=host_cache_bytes, **options)


def _build_gating(gating: str | Gating, config: ModelConfig, provider: ExpertProvider, budget: float | None,
                  manifest: Manifest, options: dict[str, Any]) -> Gating:
    """"topk" without options -> TopKGating; anything else (also "topk" with options, e.g.
    miss_precision_threshold; its logits are bit-identical to TopKGating's) ->
    decoder.gating.make_gating(name, config=, provider=, budget=, profile=, **options)."""
    if isinstance(gating, Gating):
        return gating
    if gating == "topk" and not options:
        return TopKGating(config.num_experts_per_tok)
    return make_gating(gating, config=config, provider=provider, budget=budget, profile=manifest.profile, **options)


def _build_prefetcher(model: Transformer, provider: ExpertProvider, source: ExpertSource,
                      prefetch: bool | None, options: dict[str, Any]) -> list[Prefetcher]:
    """decoder.experts.prefetch.build_prefetcher(model, provider, source, **options) -> observer
    (attached to the model) when the provider can prefetch; prefetch=False: none."""
    if prefetch is False or isinstance(provider, StoreExperts):
        return []
    pf = build_prefetcher(model, provider, source, **options)
    if pf is None:
        return []
    model.add_observer(pf)
    return [pf]
