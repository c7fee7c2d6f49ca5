"""What the decoder's gRPC clients and server agree on, defined once."""

# Generate requests carry token ids, answers stream text: 8 MiB on both ends
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# the bearer token clients of `moe-decoder serve` must send when no --auth-token-file is given
TOKEN_ENV = "MOE_DECODER_TOKEN"
