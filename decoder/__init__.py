"""Decoder: Mixtral-family model with an AdapMoE expert cache, prefetcher and adaptive gating."""
