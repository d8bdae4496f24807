"""FastAPI dependencies: the per-process Context (built in the lifespan, i.e. after uvicorn forks)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from pki.context import Context


async def get_ctx(request: Request) -> Context:
    # async: a plain `def` dependency is run in the thread pool, a thread hop per request for an attribute read
    ctx: Context = request.app.state.ctx
    return ctx


CtxDep = Annotated[Context, Depends(get_ctx)]
