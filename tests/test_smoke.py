"""End-to-end smoke of the engine: init'd hierarchy, one SECC leaf, verified by openssl."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography import x509

from pki.context import Context
from pki.issuance import pem
from tests.conftest import csr_pem


def test_secc_leaf_verifies_with_openssl(ctx: Context, tmp_path: Path) -> None:
    issued = ctx.engine.issue_from_csr("secc", csr_pem("DE*ICE*E45B*78C", dc="CPO"))
    chain = ctx.engine.chain("cpo-sub2")
    (tmp_path / "root.pem").write_text(pem(chain[-1]))
    (tmp_path / "inter.pem").write_text("".join(pem(c) for c in chain[:-1]))
    (tmp_path / "leaf.pem").write_text(pem(issued.cert))
    res = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "root.pem"),
         "-untrusted", str(tmp_path / "inter.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr + res.stdout
    assert len(issued.der) <= 800
    assert issued.cert.subject.get_attributes_for_oid(x509.NameOID.DOMAIN_COMPONENT)[0].value == "CPO"
