"""Expert store: blob format, tiers, packing, gRPC service and client (bytes only on the serving path)."""
