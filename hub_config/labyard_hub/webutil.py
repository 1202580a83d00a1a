"""What the tornado handlers of Labyard's hub services share: JSON error messages and the
caller's current identity (read from the hub through the application's ``identities``)."""

from __future__ import annotations

from tornado import web

from .access import IdentityUnavailable
from .projects import Identity


def error_message(handler: web.RequestHandler, **kwargs) -> str:
    """The message of the error ``write_error`` answers: the HTTPError's (formatted) log message,
    else the status's reason."""
    exc = kwargs.get("exc_info", (None, None, None))[1]
    if isinstance(exc, web.HTTPError) and exc.log_message:
        return exc.log_message % exc.args if exc.args else exc.log_message
    return handler._reason


async def current_identity(handler: web.RequestHandler) -> Identity:
    """The logged-in user's identity now (502 if the hub cannot say)."""
    name = handler.current_user["name"]
    try:
        return await handler.settings["identities"].get(name)
    except IdentityUnavailable as e:
        raise web.HTTPError(502, f"cannot read {name}'s identity from the hub: {e}") from e
