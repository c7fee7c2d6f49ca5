"""Shared pieces of the security tests: a tiny packed model, real server processes (from
tests/faults/fault_procs.py), and grpc status helpers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))

from fault_procs import (PROMPTS, ServiceProcess, cli, decoder_proc, free_port, generate, pack_tiny_model,  # noqa: E402,F401
                         store_proc, wait_until)


def _call(fn: Callable[[], Any]) -> None:
    """Call fn, consuming the stream if it returns one (a message is not a stream)."""
    result = fn()
    if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
        for _ in result:
            pass


def status_of(fn: Callable[[], Any]) -> grpc.StatusCode:
    """Call fn (consuming a stream if it returns one); the gRPC status it ends with."""
    try:
        _call(fn)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def rpc_error(fn: Callable[[], Any]) -> grpc.RpcError:
    try:
        _call(fn)
    except grpc.RpcError as e:
        return e
    raise AssertionError("the call succeeded")
