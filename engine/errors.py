"""Typed errors of the engine. Each names the field and the problem; none knows about HTTP
(the serving layer maps them to status codes in its one table, `serve/errors.py`)."""

from __future__ import annotations


class RerankError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(RerankError):
    """A configuration file or value is invalid."""


class InputError(RerankError):
    """A client-supplied value is unusable. `field` names it (dotted path, e.g. documents.3.image)."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")

    def __reduce__(self):
        # Survive pickling (Ray sends exceptions between processes): rebuild from (field, problem).
        return (type(self), (self.field, self.problem))


class ImageDecodeError(InputError):
    """Bytes that do not decode as an image (or video)."""


class ImageTooLarge(InputError):
    """Over a byte, pixel, frame or decode-budget limit."""


class UnknownPrecision(ConfigError):
    """A precision name that is not one of the supported ones."""


class PrecisionUnsupported(ConfigError):
    """A precision this hardware or install cannot run (fp8 or AWQ kernels on CPU, bnb without its library)."""


class ModelLoadError(RerankError):
    """The checkpoint is missing, unreadable or of an unsupported architecture."""


class DeadlineExceeded(RerankError):
    """The request's deadline passed before its work could start (it waited in a queue): the
    caller has given up on it, and running it would only delay the requests queued behind it."""
