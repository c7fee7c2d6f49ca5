"""The decoder's front ends over one `BatchScheduler`: the OpenAI-compatible HTTP API
(`http_api`, request/response shapes in `openai_protocol`, chat templates in `chat`) beside
the gRPC service (`decoder.server`)."""
