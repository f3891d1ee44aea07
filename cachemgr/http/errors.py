"""OpenAI-format API errors.

Every failure the HTTP layer reports has OpenAI's body shape, so official clients raise their typed
exceptions (BadRequestError, AuthenticationError, NotFoundError, ...)::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


class APIError(Exception):
    """A request the server refuses. Raised by parsing/handlers, turned into a JSON response by the
    error middleware; nothing about the cache or the daemon has changed when it is raised."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return web.json_response(self.body(), status=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized(message: str = "Incorrect API key provided.") -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key")


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, type="service_unavailable_error", code=code)


def internal_error(message: str = "Internal server error.") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")
