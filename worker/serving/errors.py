"""Errors that fail one request (never the engine loop); each carries the HTTP status the server answers."""

from __future__ import annotations


class ServingError(Exception):
    """A failure of one request that its caller can act on; `message` is shown verbatim."""

    status_code = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidParameterError(ServingError):
    """A sampling parameter or request field out of range; `field` names it."""

    status_code = 422


class PromptTooLongError(ServingError):
    status_code = 400


class TooManyChoicesError(ServingError):
    """n choices that could hold more of the KV cache than one request may (like an over-long prompt)."""

    status_code = 400


class AdapterNotFoundError(ServingError):
    """Unknown adapter id, or one another tenant owns (its existence is not revealed)."""

    status_code = 404


class AdapterLoadError(ServingError):
    """The adapter exists but cannot be served: not safetensors, another base model, corrupt weights."""

    status_code = 422


class EngineOverloadedError(ServingError):
    """More requests are waiting than the engine accepts; retry later."""

    status_code = 503


class EngineError(ServingError):
    """A bug inside the engine failed this request (never another's); the server keeps running.
    Its message says so without the exception's text, which the server log has."""

    status_code = 500


class ShuttingDownError(ServingError):
    status_code = 503


class AdapterSourceError(ServingError):
    """The adapter store (database, blob store) cannot be reached for now; retry shortly."""

    status_code = 503


class GrammarError(ServingError):
    """A request's output constraint (response_format, guided_regex, tools) cannot be compiled or cannot
    be satisfied; `field` names the request field that carried it."""

    status_code = 400


class NotSupportedError(ServingError):
    """What this deployment's engine cannot do at all (the message says what to do instead)."""

    status_code = 400
