"""FastAPI dependencies: the per-process Context (built in the lifespan, i.e. after uvicorn forks)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from pki.context import Context


def get_ctx(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


CtxDep = Annotated[Context, Depends(get_ctx)]
