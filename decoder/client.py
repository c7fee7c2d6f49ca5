"""`DecoderClient`: the Python client of `moe-decoder serve`'s gRPC API (adapmoe.v1.Decoder).

    from decoder.client import DecoderClient

    with DecoderClient("127.0.0.1:50052", token=None, deadline_s=60) as c:
        r = c.generate("def main(", max_tokens=32)              # whole answer
        print(r.text, r.usage.finish_reason, r.usage.tokens_per_s)
        stream = c.stream("import os", max_tokens=64, temperature=0.8, seed=1)
        for delta in stream:                                      # text as it is decoded
            print(delta.text, end="")
        print(stream.usage)                                       # set once the stream ended
        c.stats()                                                 # engine + scheduler figures
        c.ready()                                                 # gRPC health: can Generate be served?

Every call has a deadline (`deadline_s` of the client, or per call); a failed call raises
`DecoderError` with the gRPC status code name (INVALID_ARGUMENT, RESOURCE_EXHAUSTED when the
server is full, UNAVAILABLE while it waits for its model, UNAUTHENTICATED, DEADLINE_EXCEEDED...)
and the server's message. TLS: `tls_ca` (and `tls_cert` + `tls_key` for mTLS) as PEM bytes
or file paths; `token` is sent as `authorization: Bearer TOKEN`. Imports no torch.

The HTTP API of the same server (`--http-listen`) is served by the official `openai` SDK.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import grpc

from decoder._proto.adapmoe.v1 import decoder_pb2 as pb
from decoder._proto.adapmoe.v1 import decoder_pb2_grpc as pb_grpc
from decoder.wire import MAX_MESSAGE_BYTES



class DecoderError(Exception):
    """A failed call: `code` is the gRPC status code name, `details` the server's message."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str          # "length" | "stop" | "eos"
    seconds: float
    tokens_per_s: float
    experts_per_token: float
    single_expert_ratio: float
    request_id: str
    queue_seconds: float
    first_token_seconds: float

    @classmethod
    def from_proto(cls, u: pb.Usage) -> "Usage":
        return cls(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, finish_reason=u.finish_reason,
                   seconds=u.seconds, tokens_per_s=u.tokens_per_s, experts_per_token=u.experts_per_token,
                   single_expert_ratio=u.single_expert_ratio, request_id=u.request_id,
                   queue_seconds=u.queue_seconds, first_token_seconds=u.first_token_seconds)


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    usage: Usage


def _error(e: grpc.RpcError) -> DecoderError:
    code = e.code() if hasattr(e, "code") else None
    return DecoderError(code.name if code is not None else "UNKNOWN", e.details() if hasattr(e, "details") else str(e))


def _pem(value: bytes | str | os.PathLike | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {value}: {e.strerror or e}") from None


class GenerationStream:
    """The deltas of one Generate call; `usage` is set when the stream ended, `cancel()` ends it
    early (the server frees the sequence)."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False
        self.usage: Usage | None = None

    def __iter__(self) -> Iterator[Delta]:
        try:
            for msg in self._call:
                if msg.HasField("delta"):
                    yield Delta(msg.delta.text, tuple(msg.delta.token_ids))
                elif msg.HasField("usage"):
                    self.usage = Usage.from_proto(msg.usage)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and self._cancelled:
                return
            raise _error(e) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


class DecoderClient:
    """One channel to a decoder. Thread-safe (gRPC channels are); close() when done."""

    def __init__(self, address: str, *, token: str | None = None, tls_ca: bytes | str | os.PathLike | None = None,
                 tls_cert: bytes | str | os.PathLike | None = None, tls_key: bytes | str | os.PathLike | None = None,
                 tls_server_name: str | None = None, deadline_s: float = 60.0) -> None:
        if not deadline_s > 0:
            raise ValueError("deadline_s must be > 0")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a client certificate (mTLS) needs both tls_cert and tls_key")
        self.address = address
        self.deadline_s = float(deadline_s)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls_ca is not None or tls_cert is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=_pem(tls_ca, "TLS CA"),
                                                 private_key=_pem(tls_key, "TLS key"),
                                                 certificate_chain=_pem(tls_cert, "TLS certificate"))
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.DecoderStub(self._channel)

    # --- generation ---------------------------------------------------------------------
    def _request(self, prompt: str | Sequence[int], max_tokens: int, temperature: float, top_p: float,
                 seed: int | None, stop: Sequence[str]) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(temperature=temperature, top_p=top_p)
        if seed is not None:
            sampling.seed = seed
        req = pb.GenerateRequest(max_tokens=max_tokens, sampling=sampling, stop=list(stop))
        if isinstance(prompt, str):
            req.prompt = prompt
        else:
            req.prompt_token_ids.extend(int(t) for t in prompt)
        return req

    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = 0, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
               deadline_s: float | None = None, request_id: str | None = None) -> GenerationStream:
        """Generate, streamed: iterate the returned stream for Deltas. max_tokens 0 = the
        server's default; temperature 0 = greedy; seed None = random."""
        metadata = self._metadata + ((("x-request-id", request_id),) if request_id else ())
        call = self._stub.Generate(self._request(prompt, max_tokens, temperature, top_p, seed, stop),
                                   timeout=deadline_s or self.deadline_s, metadata=metadata)
        return GenerationStream(call)

    def generate(self, prompt: str | Sequence[int], **kw: Any) -> Completion:
        """The whole answer (the arguments of `stream`)."""
        stream = self.stream(prompt, **kw)
        text, ids = [], []
        for d in stream:
            text.append(d.text)
            ids.extend(d.token_ids)
        if stream.usage is None:
            raise DecoderError("INTERNAL", "the stream ended without a usage message")
        return Completion("".join(text), tuple(ids), stream.usage)

    # --- state --------------------------------------------------------------------------
    def stats(self, deadline_s: float | None = None) -> dict[str, Any]:
        """{"engine": engine.stats(), "scheduler": counters, "active", "queued", "max_active", "max_queue"}."""
        try:
            s = self._stub.GetStats(pb.GetStatsRequest(), timeout=deadline_s or self.deadline_s,
                                    metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error(e) from None
        return {"engine": json.loads(s.stats_json or "{}"), "scheduler": json.loads(s.scheduler_json or "{}"),
                "active": s.active, "queued": s.queued, "max_active": s.max_active, "max_queue": s.max_queue}

    def ready(self, deadline_s: float | None = None) -> bool:
        """gRPC health of the decoder service: True when Generate is served (model loaded)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            r = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service="adapmoe.v1.Decoder"), timeout=deadline_s or self.deadline_s)
        except grpc.RpcError as e:
            raise _error(e) from None
        return r.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "DecoderClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["DecoderClient", "DecoderError", "Completion", "Delta", "Usage", "GenerationStream"]
