"""Errors the SGLang client raises; each names the server URL so a failed rollout points at a machine."""
from __future__ import annotations


class SGLangError(RuntimeError):
    """Base class: something went wrong talking to an SGLang server."""


class ServerUnavailableError(SGLangError):
    """A server (or every server) stayed unreachable or kept failing after all retries."""


class ServerTimeoutError(SGLangError):
    """A request got no answer within its per-request timeout."""


class ServerRequestError(SGLangError):
    """The server rejected a request (4xx) or answered with a success=false body."""


class MalformedResponseError(SGLangError):
    """The server answered 200 with a body that does not follow SGLang's response format."""
