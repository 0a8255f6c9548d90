"""Every exception offload raises, in one place.

    OffloadError                 base class: catch this to catch everything below
    ├── ConfigError              a bad option or argument; the message says which and what is valid
    ├── PipelineError            a pipeline cannot be imported or does not follow the Task Interface
    ├── CodecError               a value cannot be encoded, or a wire value is malformed or too big
    ├── ServerError              the server refused the stream or became unreachable
    │   └── PipelineMismatch     client and server run different pipelines, or other code of one
    └── StateUnavailable         (server) the state store cannot be reached: the item is not run

A task that raises does not raise out of offload: the item is reported FAILED with the task's
index and the error, and the run carries on.
"""

from __future__ import annotations


class OffloadError(Exception):
    """Base class of every error offload raises."""


class ConfigError(OffloadError, ValueError):
    """An option or argument is invalid."""


class PipelineError(OffloadError):
    """A pipeline cannot be loaded or breaks the Task Interface."""


class CodecError(OffloadError, ValueError):
    """A value cannot be encoded, or a received value is malformed or exceeds a limit."""


class ServerError(OffloadError):
    """The server refused the stream, failed, or cannot be reached."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code
        self.not_run = False  # the server said it ran none of the items it did not answer


class PipelineMismatch(ServerError):
    """The server runs a different pipeline (or other code of it) than the client."""


class StateUnavailable(OffloadError):
    """The state store (``--state``) cannot be reached or is too slow: the item is not run."""
