"""Compute kernels apart from orchestration: fused MoE over a device slot table."""
