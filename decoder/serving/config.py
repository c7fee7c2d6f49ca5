"""What the decoder service's front ends (gRPC in `grpc_api`, HTTP in `http_api`) and their
composition (`service`) are configured with: addresses, request defaults, shutdown timing and
the security settings, checked once when built."""

from __future__ import annotations

from dataclasses import dataclass

from expert_store import grpc_serving


@dataclass(frozen=True)
class ServiceConfig:
    listen: str = "127.0.0.1:50052"
    default_max_tokens: int = 128   # for max_tokens = 0
    grace_s: float = 10.0           # on SIGTERM: in-flight streams get this long
    drain_s: float = 1.0            # on SIGTERM: NOT_SERVING but still accepting for this long
    max_prompt_chars: int = 1 << 20 # longer prompt text is refused before tokenizing
    token: str | None = None        # bearer token clients must send (None = no auth)
    tls_cert: bytes | None = None   # PEM; with tls_key: serve TLS
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None  # PEM; set: clients need a certificate it signed (mTLS)
    http_listen: str | None = None  # HOST:PORT of the OpenAI HTTP API (None: gRPC only)
    model: str = ""                 # the model's name (the HTTP API's `model`)
    retry_after_s: int = 1          # HTTP 429's Retry-After

    def __post_init__(self) -> None:
        grpc_serving.check_security(self.token, self.tls_cert, self.tls_key, self.tls_client_ca)

