"""Revoking a CA's own certificate takes the CA out of service (it must not issue again)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pki.errors import UnknownCA
from pki.hierarchy import init_hierarchy
from pki.wiring import build_context
from tests.conftest import csr_pem, make_settings, make_token

SMALL = """
organization: Test CA Org
country: DE
cas:
  - {name: v2g-root, profile: v2g-root, cn: Small Root}
  - {name: cpo-sub1, profile: cpo-sub1, parent: v2g-root, cn: Small Sub 1}
  - {name: cpo-sub2, profile: cpo-sub2, parent: cpo-sub1, cn: Small Sub 2, ocsp_signer: false}
"""


def test_revoked_sub_ca_stops_issuing(tmp_path: Path, token_root: Path) -> None:
    make_token(token_root, "t-carevoke")
    ctx = build_context(make_settings(tmp_path, token_root, "t-carevoke"))
    cfg = tmp_path / "h.yaml"
    cfg.write_text(SMALL)
    init_hierarchy(ctx.engine, ctx.hierarchy(cfg))
    ctx.engine.issue_from_csr("secc", csr_pem("DE*ABC*E1", dc="CPO"))
    sub2 = ctx.engine.ca("cpo-sub2")
    ctx.engine.revoke(sub2.row.serial, "cACompromise", issuer="cpo-sub1")
    assert ctx.engine.ca("cpo-sub2").row.status == "revoked"
    with pytest.raises(UnknownCA):
        ctx.engine.issue_from_csr("secc", csr_pem("DE*ABC*E2", dc="CPO"))
