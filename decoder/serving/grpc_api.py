"""The decoder's gRPC API (proto/adapmoe/v1/decoder.proto), a thin grpc.aio servicer over
`decoder.batching.BatchScheduler`:

- Generate (server streaming): one message per produced token (or several tokens when the
  client reads slower than the model decodes), then a final Usage. Sampling parameters,
  max tokens and stop strings as `Engine.generate`; deadlines and cancellation end the
  sequence and free its KV-cache row before the next step.
- Bad requests (prompt over the context, empty prompt, out-of-range parameters):
  INVALID_ARGUMENT. Full (max-active decoding and max-queue waiting): RESOURCE_EXHAUSTED at
  once. Store failures during a step: the store's status (e.g. UNAVAILABLE). Before the model
  is loaded (--wait-for-model): UNAVAILABLE with the waiter's reason.
- GetStats: engine.stats() plus the scheduler's counters.
- One JSON log line per request on stderr (id, status, token counts, latency; never text).

Health, reflection, auth and the HTTP API beside it are put together in `service`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import asdict
from typing import Any, AsyncIterator, Callable

import grpc

from decoder.batching import (BatchScheduler, ErrorEvent, FinishEvent, InvalidRequest, SamplingSpec,
                              SchedulerError, TokenEvent)
from decoder.serving.config import ServiceConfig
from decoder.serving.metrics import DecoderMetrics
from decoder._proto.adapmoe.v1 import decoder_pb2 as pb
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as pb_grpc

log = logging.getLogger("decoder.grpc")
request_log = logging.getLogger("decoder.requests")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Decoder"].full_name  # "adapmoe.v1.Decoder"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class _Abort(Exception):
    def __init__(self, code: str, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


def _status(code: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)


class DecoderServicer(pb_grpc.DecoderServicer):
    """Protobuf <-> BatchScheduler. Tokenization runs in a worker thread; the model runs on the
    scheduler's step thread; events come back through loop.call_soon_threadsafe."""

    def __init__(self, scheduler: BatchScheduler | None, config: ServiceConfig, metrics: DecoderMetrics,
                 not_ready: Callable[[], str] | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.scheduler: BatchScheduler | None = None
        self.tokenizer = None
        # why Generate is UNAVAILABLE before attach() (--wait-for-model)
        self.not_ready = not_ready or (lambda: "the model is not loaded yet")
        if scheduler is not None:
            self.attach(scheduler)

    def attach(self, scheduler: BatchScheduler) -> None:
        """Serve Generate with this (started) scheduler from now on."""
        self.tokenizer = scheduler.engine.tokenizer
        self.scheduler = scheduler

    def _spec(self, request: pb.GenerateRequest) -> SamplingSpec:
        s = request.sampling
        return SamplingSpec(max_tokens=int(request.max_tokens) or self.config.default_max_tokens,
                            temperature=float(s.temperature), top_p=float(s.top_p),
                            seed=int(s.seed) if s.HasField("seed") else None,
                            stop=tuple(request.stop)).validate()

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        limit = self.scheduler.max_seq_len
        if request.prompt and request.prompt_token_ids:
            raise InvalidRequest("give either prompt or prompt_token_ids, not both")
        if request.prompt_token_ids:
            if len(request.prompt_token_ids) > limit:
                raise InvalidRequest(f"prompt has {len(request.prompt_token_ids)} tokens, longer than the "
                                     f"context of {limit} tokens")
            return self.scheduler.check_prompt(request.prompt_token_ids)
        if not request.prompt:
            raise InvalidRequest("empty prompt")
        # refuse text that cannot fit before spending CPU on tokenizing it (no real token is
        # 64 characters long)
        max_chars = min(self.config.max_prompt_chars, max(1 << 16, 64 * limit))
        if len(request.prompt) > max_chars:
            raise InvalidRequest(f"prompt of {len(request.prompt)} characters cannot fit the context of "
                                 f"{limit} tokens")
        if self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer: send prompt_token_ids")
        return self.scheduler.check_prompt(self.tokenizer.encode(request.prompt))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        t0 = time.monotonic()
        rid = _request_id(context)
        status, prompt_n, tokens, finish, first_token_s = "OK", 0, 0, "", None
        seq = None
        try:
            if self.scheduler is None:
                raise _Abort("UNAVAILABLE", self.not_ready())
            spec = self._spec(request)
            if not self.scheduler.alive:
                raise _Abort("UNAVAILABLE", "the decoder is not serving")
            self.scheduler.ensure_room()  # refuse before spending CPU on the prompt
            ids = await asyncio.to_thread(self._prompt_ids, request)
            prompt_n = len(ids)
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None and remaining < 1e9 else None
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def sink(ev: Any) -> None:
                loop.call_soon_threadsafe(events.put_nowait, ev)

            seq = self.scheduler.submit(ids, spec, sink, deadline=deadline, request_id=rid)
            while True:
                ev = await events.get()
                if isinstance(ev, TokenEvent):
                    text, ids_out = [ev.text], [ev.token_id]
                    last = None
                    while not events.empty():  # the client reads slower than we decode: coalesce
                        nxt = events.get_nowait()
                        if not isinstance(nxt, TokenEvent):
                            last = nxt
                            break
                        text.append(nxt.text)
                        ids_out.append(nxt.token_id)
                    if first_token_s is None:
                        first_token_s = time.monotonic() - t0
                    tokens += len(ids_out)
                    yield pb.GenerateResponse(delta=pb.TokenDelta(text="".join(text), token_ids=ids_out))
                    if last is None:
                        continue
                    ev = last
                if isinstance(ev, FinishEvent):
                    u = ev.usage
                    finish = u.finish_reason
                    yield pb.GenerateResponse(usage=pb.Usage(
                        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                        finish_reason=u.finish_reason, seconds=u.seconds, tokens_per_s=u.tokens_per_s,
                        experts_per_token=u.experts_per_token, single_expert_ratio=u.single_expert_ratio,
                        request_id=rid, queue_seconds=u.queue_s, first_token_seconds=u.first_token_s))
                    return
                if isinstance(ev, ErrorEvent):
                    raise _Abort(ev.code, ev.message)
        except SchedulerError as e:
            status = e.code
            await context.abort(_status(e.code), str(e))
        except _Abort as e:
            status = e.code
            await context.abort(_status(e.code), e.details)
        except GeneratorExit:  # the stream was closed under us (client gone)
            status = "CANCELLED"
            raise
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            status = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except Exception as e:
            if type(e).__name__ == "AbortError" or isinstance(e, grpc.aio.AbortError):
                raise
            status = "INTERNAL"
            log.exception("Generate %s failed", rid)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            if seq is not None:
                self.scheduler.cancel(seq)  # no-op when it finished; frees the row otherwise
            seconds = time.monotonic() - t0
            self.metrics.request(status, seconds, prompt_n, tokens, first_token_s)
            request_log.info(json.dumps({
                "ts": round(time.time(), 3), "event": "generate", "id": rid, "status": status,
                "prompt_tokens": prompt_n, "tokens": tokens, "finish": finish,
                "latency_s": round(seconds, 4),
                "first_token_s": None if first_token_s is None else round(first_token_s, 4),
                "max_tokens": int(request.max_tokens), "temperature": float(request.sampling.temperature),
            }, separators=(",", ":")))

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.DecoderStats:
        sch = self.scheduler
        if sch is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.not_ready())
        stats = await asyncio.to_thread(sch.engine_stats)
        return pb.DecoderStats(stats_json=json.dumps(stats, default=str), active=sch.active, queued=sch.queued,
                               max_active=sch.max_active, max_queue=sch.max_queue,
                               scheduler_json=json.dumps({**asdict(sch.stats), "max_seq_len": sch.max_seq_len,
                                                          "kv_cache_bytes": sch.kv_cache_bytes(),
                                                          "rows_in_use": sch.rows_in_use()}))


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID_RE.match(value):
            return value
    return uuid.uuid4().hex[:16]

