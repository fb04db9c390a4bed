"""The error hierarchy: one root whose fields travel unchanged to the socket, CLI and MCP."""

from __future__ import annotations


class CwmError(Exception):
    """Root of every cwm error; carries a stable code, a message and a retry hint."""

    code = "internal"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable

    def to_dict(self) -> dict[str, object]:
        """The wire form `{code, message, retryable}`."""
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class ConfigError(CwmError):
    """A configuration value is missing or invalid."""

    code = "bad_config"


class BlobCorruptError(CwmError):
    """A blob's header or digest does not verify; it is never loaded."""

    code = "blob_corrupt"


class BlobMissingError(CwmError):
    """A blob named by the catalog is not in the store."""

    code = "blob_missing"
    retryable = True


class StoreError(CwmError):
    """The store could not read or write (disk full, permissions, I/O)."""

    code = "store_error"
    retryable = True


class StoreFullError(StoreError):
    """Windows alone would pass the disk budget: the op wrote nothing (delete windows or
    raise `disk_bytes`)."""

    code = "store_full"
    retryable = False
