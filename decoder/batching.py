"""Continuous batching for the decoder service: the plain logic the gRPC and HTTP front ends (decoder/serving/) share.

    scheduler = BatchScheduler(engine, max_active=4, max_queue=16)
    scheduler.start()                                 # the step loop runs on its own thread
    seq = scheduler.submit(prompt_ids, SamplingSpec(max_tokens=32), sink)   # sink(event) per token
    scheduler.cancel(seq)                             # frees its KV-cache row at the next step boundary
    scheduler.close()

Up to `max_active` sequences are decoded together: every step runs ONE forward pass of
`Transformer.forward(tokens [B, 1], input_pos [B, 1])` over all active sequences, each at its
own position and in its own row of a static KV cache, so the MoE layers see the union of the
batch's experts once per layer and step (`MoEBlock` prepares/gets each needed expert once).
A sequence that arrives is prefilled alone (one forward over its prompt, into its row) and
joins the batch from the next step. Beyond `max_active`, up to `max_queue` sequences wait;
beyond that `submit` raises `QueueFull` at once (the server answers RESOURCE_EXHAUSTED).

The per-row KV cache is `RowKVCache`, a `KVCache` (decoder/model/transformer.py) that maps
batch row b to cache row `rows[b]` (the rows of the sequences in this step), installed in
every attention layer by the scheduler; nothing in the model changes.

Results are those of `Engine.generate` for the same prompt and parameters: the same prefill
(a lone forward over the prompt), the same sampler with a per-sequence torch.Generator seeded
the same way, the same stop-string / EOS / length rules and the same text streaming (held-back
partial UTF-8 and possible stop-string prefixes). Greedy tokens are identical batched or not
(tests/unit/test_batching.py checks it).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from decoder.engine import Engine, _find_stop, _safe_len
from decoder.model.transformer import KVCache
from decoder.routing import MoEObserver
from decoder.tokenizer import StreamDecoder

log = logging.getLogger("decoder.batching")

# Bounds on request parameters: anything beyond is an INVALID_ARGUMENT, not work.
MAX_TOKENS_LIMIT = 1 << 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TEMPERATURE = 100.0


# --------------------------------------------------------------------------------------------
# errors (each carries the gRPC status code name the server answers with)
# --------------------------------------------------------------------------------------------
class SchedulerError(Exception):
    code = "INTERNAL"


class InvalidRequest(SchedulerError, ValueError):
    code = "INVALID_ARGUMENT"


class QueueFull(SchedulerError):
    code = "RESOURCE_EXHAUSTED"


class ShuttingDown(SchedulerError):
    code = "UNAVAILABLE"


# --------------------------------------------------------------------------------------------
# requests and events
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingSpec:
    """What a request asks for. temperature 0 = greedy; top_p 0 or 1 = off; seed None = random."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def validate(self) -> "SamplingSpec":
        if not isinstance(self.max_tokens, int) or not 0 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise InvalidRequest(f"max_tokens must be in [0, {MAX_TOKENS_LIMIT}], got {self.max_tokens}")
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 <= self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in [0, 1] (0 or 1 = off), got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise InvalidRequest("seed must be in [0, 2^63)")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if len(s) > MAX_STOP_CHARS:
                raise InvalidRequest(f"stop strings must be at most {MAX_STOP_CHARS} characters")
        return self


@dataclass(frozen=True)
class TokenEvent:
    text: str        # text delta (may be "" while text is held back)
    token_id: int


@dataclass(frozen=True)
class Usage:
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str          # "length" | "stop" | "eos"
    seconds: float              # submit -> finish (queue + prefill + decode)
    queue_s: float              # submit -> admitted into a row
    first_token_s: float        # submit -> first token
    experts_per_token: float    # per (token, layer) routing decision, decode phase (else prefill)
    single_expert_ratio: float

    @property
    def tokens_per_s(self) -> float:
        busy = self.seconds - self.queue_s
        return self.completion_tokens / busy if busy > 0 else 0.0


@dataclass(frozen=True)
class FinishEvent:
    usage: Usage


@dataclass(frozen=True)
class ErrorEvent:
    code: str        # gRPC status code name: DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE, INTERNAL, ...
    message: str


Event = TokenEvent | FinishEvent | ErrorEvent
Sink = Callable[[Event], None]

_ids = itertools.count(1)


@dataclass(eq=False)
class SequenceState:
    """One request inside the scheduler. Mutated only by the step thread (and `cancelled`)."""

    request_id: str
    prompt_ids: list[int]
    spec: SamplingSpec
    sink: Sink
    deadline: float | None                  # time.monotonic() deadline, None = none
    max_new: int                            # tokens this sequence may produce (context-capped)
    submitted: float = field(default_factory=time.monotonic)
    row: int = -1
    pos: int = 0                            # position of the next token fed to the model
    last_token: int = -1
    out_ids: list[int] = field(default_factory=list)
    emitted: str = ""
    text: str = ""
    stream: StreamDecoder | None = None
    generator: torch.Generator | None = None
    admitted: float | None = None
    first_token: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    done: bool = False

    @property
    def completion_tokens(self) -> int:
        return len(self.out_ids)


# --------------------------------------------------------------------------------------------
# the per-row KV cache
# --------------------------------------------------------------------------------------------
class RowSelection:
    """Which cache rows the batch rows of the current forward use (shared by all layers)."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None   # [B] int64 on the cache's device
        self.start: int | None = None           # set when rows are start, start+1, ... (a view suffices)

    def set(self, rows: Sequence[int], device: torch.device) -> None:
        rows = list(rows)
        contiguous = all(b - a == 1 for a, b in zip(rows, rows[1:]))
        self.start = rows[0] if contiguous else None
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)

    def clear(self) -> None:
        self.rows, self.start = None, None


class RowKVCache(KVCache):
    """Static cache k/v [R, nkv, max_seq, hd] where batch row b of a forward reads and writes
    cache row `selection.rows[b]`. Without a selection it behaves as `KVCache` (rows 0..B-1)."""

    def __init__(self, selection: RowSelection, max_rows: int, max_seq_length: int, n_kv: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None, v_dim: int | None = None) -> None:
        super().__init__(max_rows, max_seq_length, n_kv, head_dim, dtype, device, v_dim=v_dim)
        self.selection = selection

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # input_pos: [S] or [B, S]; k, v: [B, nkv, S, hd] -> k, v: [B, nkv, length, hd]
        sel = self.selection
        if sel.rows is None:
            return super().update(input_pos, k, v, length)
        B, S = k.shape[0], k.shape[2]
        if sel.start is not None:  # contiguous rows: work on a view, exactly as KVCache does
            kc = self.k_cache[sel.start:sel.start + B]
            vc = self.v_cache[sel.start:sel.start + B]
            if input_pos.dim() == 1:
                kc[:, :, input_pos] = k
                vc[:, :, input_pos] = v
            else:
                b = torch.arange(B, device=k.device)[:, None]        # [B, 1]
                kc[b, :, input_pos] = k.transpose(1, 2)              # [B, S, nkv, hd]
                vc[b, :, input_pos] = v.transpose(1, 2)
            return kc[:, :, :length], vc[:, :, :length]
        rows = sel.rows[:, None]                                     # [B, 1]
        pos = input_pos if input_pos.dim() == 2 else input_pos.expand(B, S)
        self.k_cache[rows, :, pos] = k.transpose(1, 2)
        self.v_cache[rows, :, pos] = v.transpose(1, 2)
        return self.k_cache[sel.rows, :, :length], self.v_cache[sel.rows, :, :length]   # gathered copies


class _RoutingAttribution(MoEObserver):
    """Counts each KV-cache row's routing decisions on the device (no host sync per layer):
    counts[row, phase] = [decisions, experts used, single-expert decisions], phase 0 prefill,
    1 decode. Token t of a forward over B rows belongs to batch row t // S, i.e. cache row
    selection.rows[t // S]. Read once per sequence, when it finishes."""

    PHASES = ("prefill", "decode")

    def __init__(self, selection: RowSelection, rows: int, device: torch.device) -> None:
        self.selection = selection
        self.counts = torch.zeros(rows, 2, 3, dtype=torch.int64, device=device)
        self.phase = 1
        # the decode step (decoder/step.py), whose batch row b is cache row b, adds here
        self.decode_row_counts = self.counts[:, 1]

    def reset_row(self, row: int) -> None:
        self.counts[row].zero_()

    def read_row(self, row: int) -> dict[str, list[int]]:
        c = self.counts[row].tolist()
        return {name: c[i] for i, name in enumerate(self.PHASES)}

    def on_routing(self, layer: int, router_logits: torch.Tensor, weights: torch.Tensor,
                   idx: torch.Tensor) -> None:
        rows = self.selection.rows
        if rows is None:  # a forward the scheduler did not start (e.g. Engine.generate)
            return
        n = (idx >= 0).sum(dim=-1)                                             # [T]
        per_token = torch.stack([torch.ones_like(n), n, (n == 1).to(n.dtype)], dim=-1)   # [T, 3]
        owners = rows.repeat_interleave(n.shape[0] // rows.shape[0])           # [T] cache rows
        self.counts[:, self.phase].index_add_(0, owners, per_token.to(self.counts.dtype))


# --------------------------------------------------------------------------------------------
# the scheduler
# --------------------------------------------------------------------------------------------
@dataclass
class SchedulerStats:
    steps: int = 0               # decode forwards
    prefills: int = 0
    batched_tokens: int = 0      # tokens produced by decode forwards (sum of batch sizes)
    max_batch: int = 0
    completed: int = 0
    cancelled: int = 0
    expired: int = 0
    failed: int = 0
    rejected: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0


class BatchScheduler:
    """Continuous batching over one `Engine` (which it then owns: nothing else may run the
    model while the scheduler is started).

    max_active: KV-cache rows = sequences decoded together. max_queue: sequences that may wait
    for a row. max_seq_len: positions per row (prompt + generated); default and upper bound
    the model's context. A prompt longer than it is an `InvalidRequest`.
    on_step(batch_size, seconds): called after every decode forward (metrics).
    """

    def __init__(self, engine: Engine, max_active: int = 4, max_queue: int = 16, max_seq_len: int | None = None,
                 on_step: Callable[[int, float], None] | None = None) -> None:
        if max_active < 1:
            raise ValueError("max_active must be >= 1")
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        ctx = engine.config.max_position_embeddings
        if max_seq_len is None:
            max_seq_len = ctx
        if not 1 <= max_seq_len <= ctx:
            raise ValueError(f"max_seq_len must be in [1, {ctx}] (the model's context)")
        self.engine = engine
        self.model = engine.model
        self.max_active = max_active
        self.max_queue = max_queue
        self.max_seq_len = max_seq_len
        self.on_step = on_step
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._queue: deque[SequenceState] = deque()
        self._active: dict[int, SequenceState] = {}
        self._free_rows: list[int] = list(range(max_active))
        heapq.heapify(self._free_rows)
        self._step_lock = threading.Lock()   # held while the model runs; stats readers take it
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._selection = RowSelection()
        p = engine.model.embed_tokens.weight
        self._attribution = _RoutingAttribution(self._selection, max_active, p.device)
        self._installed = False
        self.failure: BaseException | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> "BatchScheduler":
        if self._thread is not None:
            return self
        self._install_caches()
        self._thread = threading.Thread(target=self._run, name="decoder-step-loop", daemon=True)
        self._thread.start()
        return self

    def _install_caches(self) -> None:
        n_kv, k_dim, v_dim = KVCache.dims(self.model.config)   # MLA: the latent and the RoPE key
        p = self.model.embed_tokens.weight
        for block in self.model.layers:
            block.self_attn.kv_cache = RowKVCache(self._selection, self.max_active, self.max_seq_len,
                                                  n_kv, k_dim, dtype=p.dtype, device=p.device, v_dim=v_dim)
        # so that setup_caches() (Engine.generate) reuses these caches instead of replacing them
        self.model.max_batch_size, self.model.max_seq_length = self.max_active, self.max_seq_len
        self.model.add_observer(self._attribution)
        self._installed = True

    def close(self, timeout: float = 30.0) -> None:
        """Stop the step loop; sequences still queued or active get an UNAVAILABLE error."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            leftovers = list(self._queue) + list(self._active.values())
            self._queue.clear()
            for seq in leftovers:
                self._release(seq)
        for seq in leftovers:
            self._emit(seq, ErrorEvent("UNAVAILABLE", "the decoder is shutting down"))
        if self._installed:
            with self._step_lock:
                self.model.remove_observer(self._attribution)
                self.model.clear_caches()
            self._installed = False

    def __enter__(self) -> "BatchScheduler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- requests -------------------------------------------------------------------------
    def check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise InvalidRequest("empty prompt")
        V = self.engine.config.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise InvalidRequest(f"token ids must be in [0, {V})")
        if len(ids) > self.max_seq_len:
            raise InvalidRequest(f"prompt has {len(ids)} tokens, longer than the context of "
                                 f"{self.max_seq_len} tokens")
        return ids

    def submit(self, prompt_ids: Sequence[int], spec: SamplingSpec, sink: Sink, *,
               deadline: float | None = None, request_id: str | None = None) -> SequenceState:
        """Queue a sequence. Raises InvalidRequest (bad prompt / parameters), QueueFull (no
        room: max_active + max_queue sequences already in) or ShuttingDown. `deadline` is a
        time.monotonic() instant: past it the sequence ends with DEADLINE_EXCEEDED."""
        spec.validate()
        ids = self.check_prompt(prompt_ids)
        if spec.stop and self.engine.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer")
        max_new = min(spec.max_tokens, self.max_seq_len - len(ids) + 1)
        seq = SequenceState(request_id=request_id or f"seq-{next(_ids)}", prompt_ids=ids, spec=spec,
                            sink=sink, deadline=deadline, max_new=max_new)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the decoder is shutting down")
            self._check_room()
            self._queue.append(seq)
            self._cond.notify_all()
        return seq

    def cancel(self, seq: SequenceState) -> None:
        """Drop a sequence: a queued one at once, an active one (and its KV-cache row) before the
        next forward step. No further events are sent for it. Idempotent."""
        with self._cond:
            if seq.done or seq.cancelled:
                return
            seq.cancelled = True
            self.stats.cancelled += 1
            try:
                self._queue.remove(seq)
                seq.done = True
            except ValueError:
                pass
            self._cond.notify_all()

    def kv_cache_bytes(self) -> int:
        """Bytes of the per-row KV caches (all layers, keys and values)."""
        cfg = self.model.config
        n_kv, k_dim, v_dim = KVCache.dims(cfg)
        elem = self.model.embed_tokens.weight.element_size()
        return cfg.num_hidden_layers * self.max_active * n_kv * self.max_seq_len * (k_dim + v_dim) * elem

    @property
    def active(self) -> int:
        with self._cond:
            return sum(1 for s in self._active.values() if not s.cancelled)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def rows_in_use(self) -> int:
        with self._cond:
            return len(self._active)

    def engine_stats(self) -> dict[str, Any]:
        """engine.stats() read between steps (never while the model runs)."""
        with self._step_lock:
            return self.engine.stats()

    # --- the step loop ----------------------------------------------------------------------
    def _emit(self, seq: SequenceState, event: Event) -> None:
        try:
            seq.sink(event)
        except Exception:  # a sink that cannot take events any more: the client is gone
            log.debug("sink of %s failed; cancelling it", seq.request_id, exc_info=True)
            seq.cancelled = True

    def _release(self, seq: SequenceState) -> None:
        """Free seq's row (caller holds _cond)."""
        seq.done = True
        if seq.row >= 0 and self._active.get(seq.row) is seq:
            del self._active[seq.row]
            heapq.heappush(self._free_rows, seq.row)
        seq.row = -1

    @property
    def alive(self) -> bool:
        """False once the step loop died (a bug, not a request error): the process should restart."""
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    def ensure_room(self) -> None:
        """A cheap early check before a request is prepared (submit() decides): raises QueueFull
        when a sequence could not be queued right now."""
        with self._cond:
            self._check_room()

    def _check_room(self) -> None:
        live = len(self._queue) + sum(1 for s in self._active.values() if not s.cancelled)
        if live >= self.max_active + self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(f"overloaded: {self.max_active} sequences active and {self.max_queue} queued "
                            f"(the limits); retry later")

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # never leave requests waiting on a dead loop
            self.failure = e
            log.critical("the decoder step loop died: %s: %s", type(e).__name__, e, exc_info=True)
            with self._cond:
                self._stopping = True
                leftovers = list(self._queue) + list(self._active.values())
                self._queue.clear()
                for seq in leftovers:
                    self._release(seq)
            for seq in leftovers:
                self._emit(seq, ErrorEvent("INTERNAL", f"the decoder step loop died: {type(e).__name__}"))

    @torch.inference_mode()
    def _loop(self) -> None:  # inference mode, as Engine.generate: tensors either creates are interchangeable
        while True:
            errors: list[tuple[SequenceState, ErrorEvent]] = []
            with self._cond:
                while not self._stopping and not self._queue and not self._active:
                    self._cond.wait()
                if self._stopping:
                    return
                now = time.monotonic()
                for seq in list(self._active.values()):
                    if seq.cancelled:
                        self._release(seq)
                    elif seq.deadline is not None and now >= seq.deadline:
                        self._release(seq)
                        self.stats.expired += 1
                        errors.append((seq, ErrorEvent("DEADLINE_EXCEEDED", "deadline exceeded while decoding")))
                for seq in list(self._queue):
                    if seq.deadline is not None and now >= seq.deadline:
                        self._queue.remove(seq)
                        seq.done = True
                        self.stats.expired += 1
                        errors.append((seq, ErrorEvent("DEADLINE_EXCEEDED", "deadline exceeded while queued")))
                decoding = sorted((s for s in self._active.values() if s.out_ids), key=lambda s: s.row)
                admitted: list[SequenceState] = []
                while self._queue and self._free_rows:
                    seq = self._queue.popleft()
                    seq.row = heapq.heappop(self._free_rows)
                    seq.admitted = now
                    self._active[seq.row] = seq
                    admitted.append(seq)
            for seq, ev in errors:
                self._emit(seq, ev)
            finished: list[SequenceState] = []
            with self._step_lock:
                for seq in admitted:
                    if seq.cancelled:
                        continue
                    if self._guarded(self._prefill, [seq]):
                        finished.append(seq)
                if decoding:
                    finished.extend(self._guarded(self._decode, decoding) or [])
            if finished:
                with self._cond:
                    for seq in finished:
                        self._release(seq)

    def _guarded(self, fn: Callable[[list[SequenceState]], Any], seqs: list[SequenceState]) -> Any:
        """Run a forward step; on an error fail its sequences (freeing their rows), keep serving."""
        try:
            return fn(seqs)
        except Exception as e:
            code = getattr(e, "code", None)
            code = code if isinstance(code, str) and code.isupper() else (
                "INVALID_ARGUMENT" if isinstance(e, ValueError) else "INTERNAL")
            log.error("forward step of %d sequence(s) failed: %s: %s", len(seqs), type(e).__name__, e,
                      exc_info=code == "INTERNAL")
            self.stats.failed += len(seqs)
            with self._cond:
                for seq in seqs:
                    self._release(seq)
            for seq in seqs:
                self._emit(seq, ErrorEvent(code, f"{type(e).__name__}: {e}" if code == "INTERNAL" else str(e)))
            return None
        finally:
            self._selection.clear()

    def _prefill(self, seqs: list[SequenceState]) -> bool:
        """Forward the prompt into the sequence's row; sample its first token. True when done."""
        (seq,) = seqs
        eng = self.engine
        dev = eng.device
        self._attribution.reset_row(seq.row)
        if seq.max_new <= 0:  # max_tokens 0: nothing to compute (as Engine.generate)
            self._finish(seq, "length")
            return True
        seq.generator = torch.Generator(device=dev)
        seq.generator.manual_seed(seq.spec.seed if seq.spec.seed is not None
                                  else int.from_bytes(os.urandom(8), "little") >> 1)
        seq.stream = StreamDecoder(eng.tokenizer) if eng.tokenizer is not None else None
        n = len(seq.prompt_ids)
        t0 = time.perf_counter()
        self._selection.set([seq.row], dev)
        self._attribution.phase = 0
        eng.routing.phase = "prefill"
        eng.provider.begin_token()
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=dev)               # [1, n]
        logits = self.model(ids, torch.arange(n, device=dev), last_only=True)[0, -1]    # [V]
        dt = time.perf_counter() - t0
        seq.pos = n
        self.stats.prefills += 1
        self.stats.prefill_s += dt
        self._count_engine(requests=1, prompt_tokens=n, prefill_s=dt)
        return self._take(seq, logits)

    def _decode(self, seqs: list[SequenceState]) -> list[SequenceState]:
        """One forward for every decoding sequence (one token each); returns those that finished."""
        eng = self.engine
        dev = eng.device
        B = len(seqs)
        t0 = time.perf_counter()
        self._attribution.phase = 1
        eng.routing.phase = "decode"
        eng.provider.begin_token()
        # the GPU-driven step: batch row = cache row, over the smallest bucket (1, 2, 4, ...)
        # holding the highest row in use; free rows ride along as inactive padding
        bucket = min(self.max_active, 1 << max(s.row for s in seqs).bit_length())
        step = eng.decode_step_for(bucket)
        if step is not None:
            tokens = torch.zeros(bucket, dtype=torch.long)
            pos = torch.zeros(bucket, dtype=torch.long)
            active = torch.zeros(bucket, dtype=torch.bool)
            for s in seqs:
                tokens[s.row], pos[s.row], active[s.row] = s.last_token, s.pos, True
            logits = step.run(tokens, pos, active)[[s.row for s in seqs]]                     # [B, V]
            if dev.type == "cuda":
                torch.cuda.current_stream(dev).synchronize()   # timed as the GPU's work
        else:
            self._selection.set([s.row for s in seqs], dev)
            tokens = torch.tensor([[s.last_token] for s in seqs], dtype=torch.long, device=dev)   # [B, 1]
            positions = [s.pos for s in seqs]
            if len(set(positions)) == 1:
                input_pos = torch.tensor(positions[:1], dtype=torch.long, device=dev)             # [1] shared
            else:
                input_pos = torch.tensor(positions, dtype=torch.long, device=dev)[:, None]        # [B, 1]
            logits = self.model(tokens, input_pos)[:, -1]                                          # [B, V]
        dt = time.perf_counter() - t0
        st = self.stats
        st.steps += 1
        st.batched_tokens += B
        st.max_batch = max(st.max_batch, B)
        st.decode_s += dt
        self._count_engine(decode_steps=B, decode_s=dt)
        if self.on_step is not None:
            try:
                self.on_step(B, dt)
            except Exception:
                log.debug("on_step failed", exc_info=True)
        # greedy rows: one argmax and one device->host copy for the whole batch (not one per row)
        greedy = logits.argmax(dim=-1).tolist() if any(s.spec.temperature == 0 for s in seqs) else None
        finished = []
        for b, seq in enumerate(seqs):
            seq.pos += 1
            if seq.cancelled:
                continue
            tok = greedy[b] if greedy is not None and seq.spec.temperature == 0 else None
            if self._take(seq, logits[b], tok):
                finished.append(seq)
        return finished

    def _take(self, seq: SequenceState, logits: torch.Tensor, tok: int | None = None) -> bool:
        """Sample the next token from logits [V] (or take `tok`, its greedy argmax computed
        for the whole batch), stream it; True when the sequence is done. The same rules, in the
        same order, as Engine.generate."""
        eng = self.engine
        spec = seq.spec
        if tok is None:
            tok = Engine._sample(logits, spec.temperature, spec.top_p, seq.generator)
        seq.out_ids.append(tok)
        seq.last_token = tok
        self.stats.generated_tokens += 1
        self._count_engine(generated_tokens=1)
        if seq.first_token is None:
            seq.first_token = time.monotonic()
        done = None
        if tok in eng.config.eos_token_ids:
            done = "eos"
        elif len(seq.out_ids) >= seq.max_new:
            done = "length"
        delta = ""
        stops = [s for s in spec.stop if s]
        if seq.stream is not None:
            seq.stream.ids.append(tok)
            full = seq.stream.full_text()
            if stops:
                cut = _find_stop(full, stops, max(0, len(seq.emitted) - max(map(len, stops))))
                if cut is not None:
                    full, done = full[:cut], "stop"
            seq.text = full
            safe = len(full) if done else _safe_len(full, stops)
            if safe > len(seq.emitted) and full.startswith(seq.emitted):
                delta, seq.emitted = full[len(seq.emitted):safe], full[:safe]
        if not seq.cancelled:
            self._emit(seq, TokenEvent(delta, tok))
        if done:
            self._finish(seq, done)
            return True
        return False

    def _finish(self, seq: SequenceState, reason: str) -> None:
        seq.finish_reason = reason
        seq.done = True  # a cancel() from now on is a no-op (the row is released after this step)
        now = time.monotonic()
        routing = self._attribution.read_row(seq.row) if seq.row >= 0 else {"decode": [0, 0, 0]}
        phase = "decode" if routing.get("decode", [0])[0] else "prefill"
        d, used, single = routing.get(phase, [0, 0, 0])
        usage = Usage(request_id=seq.request_id, prompt_tokens=len(seq.prompt_ids),
                      completion_tokens=len(seq.out_ids), finish_reason=reason, seconds=now - seq.submitted,
                      queue_s=((seq.admitted or now) - seq.submitted),
                      first_token_s=((seq.first_token or now) - seq.submitted),
                      experts_per_token=(used / d) if d else 0.0, single_expert_ratio=(single / d) if d else 0.0)
        self.stats.completed += 1
        if not seq.cancelled:
            self._emit(seq, FinishEvent(usage))

    def _count_engine(self, **inc: float) -> None:
        """Keep engine.stats() truthful: the scheduler bypasses Engine.generate, so it adds to
        the engine's counters what generate would have (requests, tokens, prefill/decode time)."""
        c = self.engine._counters
        for name, v in inc.items():
            setattr(c, name, getattr(c, name) + v)


__all__ = [
    "BatchScheduler", "SamplingSpec", "SequenceState", "TokenEvent", "FinishEvent", "ErrorEvent", "Usage",
    "RowKVCache", "RowSelection", "SchedulerError", "InvalidRequest", "QueueFull", "ShuttingDown",
    "MAX_TOKENS_LIMIT",
]
