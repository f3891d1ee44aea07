"""OpenAI-compatible HTTP API of the cachemgr daemon. Entry point: build_http_app."""

from __future__ import annotations

from cachemgr.http.app import build_http_app

__all__ = ["build_http_app"]
