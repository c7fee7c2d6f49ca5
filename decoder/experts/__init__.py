"""Expert providers (decoder/experts/provider.py), the AdapMoE expert cache and the prefetcher."""
