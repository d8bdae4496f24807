"""Import-string entry points for uvicorn (several worker processes need an import string)."""

from __future__ import annotations

from fastapi import FastAPI

from api.app import create_app


def create_default_app() -> FastAPI:
    return create_app(freeze_gc=True)
