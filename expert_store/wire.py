"""What the store's clients and servers agree on, defined once: message size limit, the bearer
token's environment variable, the kinds of file PutBlob accepts."""

# a GetManifest answer carries tokenizer.json and the chat template: 16 MiB on both ends
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# the bearer token when no --token-file is given (server: required from clients; client: sent)
TOKEN_ENV = "EXPERT_STORE_TOKEN"
# one model's files, as PutBlob names them (the manifest last)
PUT_KINDS = ("expert", "dense", "config", "tokenizer", "tokenizer_config", "profile", "manifest")
