"""`moe-decoder serve`: the decoder's front ends over one `BatchScheduler`.

- `grpc_api`: the gRPC servicer (proto/adapmoe/v1/decoder.proto).
- `http_api`: the OpenAI-compatible HTTP API (request/response shapes in `openai_protocol`,
  chat templates in `chat`).
- `service`: both front ends, health, auth and TLS, and their start/drain/stop lifecycle.
- `metrics`: the Prometheus metrics; `waiter`: --wait-for-model; `config`: ServiceConfig.
- `launch`: one serving process (engine, scheduler, metrics endpoint, service).

Flags are parsed in `decoder.cli`, which calls `launch.run`; nothing here imports the CLI."""
