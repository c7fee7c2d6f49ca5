"""Errors of the expert store, one per gRPC status code they map to.

Both the in-process path (``ModelStore``) and the gRPC client raise these, so callers
handle one family of exceptions whichever way they reach a store. ``code`` is the name of
the ``grpc.StatusCode`` the server answers with (the server maps it; this module does not
import grpc).
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class. ``code`` names the gRPC status code (``grpc.StatusCode[code]``)."""

    code: str = "UNKNOWN"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(StoreError):
    """Malformed request: bad model name, index out of range, unknown precision..."""

    code = "INVALID_ARGUMENT"


class NotFound(StoreError):
    """The model, blob or file does not exist in the store."""

    code = "NOT_FOUND"


class ResourceExhausted(StoreError):
    """Too many refs in one call, too many concurrent streams, disk full..."""

    code = "RESOURCE_EXHAUSTED"


class DataLoss(StoreError):
    """Stored bytes failed their integrity check and no tier has a good copy."""

    code = "DATA_LOSS"


class Unavailable(StoreError):
    """The store (or every replica of it) cannot be reached right now; retryable."""

    code = "UNAVAILABLE"


ERRORS_BY_CODE: dict[str, type[StoreError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, ResourceExhausted, DataLoss, Unavailable)
}


def error_for_code(code: str, message: str = "") -> StoreError:
    """Build the StoreError subclass for a gRPC status name (falls back to StoreError)."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        return StoreError(message, code=code)
    return cls(message)


__all__ = [
    "StoreError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "DataLoss",
    "Unavailable",
    "ERRORS_BY_CODE",
    "error_for_code",
]
