"""A server worker's start-up objects leave the garbage collector's generations (gc.freeze), so a full
collection set off by a request does not re-scan them; an app built in a test leaves the collector alone."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from fastapi.testclient import TestClient

import api.main
from api.app import create_app
from pki.context import Context


@pytest.fixture()
def unfrozen() -> Any:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the suite runs with the collector as it was


def test_a_server_app_freezes_what_start_up_built(ctx: Context, unfrozen: None) -> None:
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(ctx, routers=[], freeze_gc=True)) as client:  # runs the lifespan
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() > 0


def test_an_app_built_in_a_test_does_not(ctx: Context, unfrozen: None) -> None:
    with TestClient(create_app(ctx, routers=[])) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() == 0


def test_the_uvicorn_entry_point_builds_a_server_app(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(api.main, "create_app", lambda **kw: seen.update(kw))
    api.main.create_default_app()
    assert seen == {"freeze_gc": True}
