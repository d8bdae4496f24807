"""Signed firmware (#27 item 3): a manufacturer's root and firmware-signing certificate (key in the HSM),
`v2gpki firmware sign|verify`, POST /v1/firmware/signatures (digest or streamed image), rollback protection,
the audit record, and what a charging station checks — with openssl as the independent verifier
(`openssl dgst -sha256 -verify` is what EVerest's evse_security runs: EVP_PKEY_verify over SHA-256(file))."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from sqlmodel import select

from pki.context import Context
from pki.firmware import ca_name_for, current_signing_certificate, setup, sign_digest, version_key
from pki.orgs import create_api_key, create_org
from pki.store.models import AuditEvent
from pki.store.models_firmware import FirmwareSignature
from tests import ocpp_schemas
from tests.conftest import cli_env, run_cli


def _manufacturer(ctx: Context, tag: str) -> str:
    name = f"Mfr {tag} {secrets.token_hex(3)}"
    create_org(ctx.db, name, "manufacturer", [])
    setup(ctx, name)
    return name


@pytest.fixture(scope="module")
def maker(ctx: Context) -> str:
    return _manufacturer(ctx, "A")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("fw") / "charger-fw.bin"
    p.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    return p


def _product() -> str:
    return f"wallbox-{secrets.token_hex(3)}"


def _events(ctx: Context, obj: str) -> list[AuditEvent]:
    with ctx.db.session() as s:
        return list(s.exec(select(AuditEvent).where(AuditEvent.action == "firmware.sign", AuditEvent.object == obj)))


def _rows(ctx: Context, product: str) -> list[FirmwareSignature]:
    with ctx.db.session() as s:
        return list(s.exec(select(FirmwareSignature).where(FirmwareSignature.product == product)))


def _openssl_checks(work: Path, fw: dict[str, str], file: Path, root: x509.Certificate) -> tuple[int, int]:
    """(`openssl dgst -sha256 -verify` exit, `openssl verify` exit) for the firmware object."""
    (work / "signing.pem").write_text(fw["signingCertificate"])
    cert = x509.load_pem_x509_certificate(fw["signingCertificate"].encode())
    (work / "pub.pem").write_bytes(cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (work / "sig.der").write_bytes(base64.b64decode(fw["signature"]))
    (work / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    dgst = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(work / "pub.pem"), "-signature",
                           str(work / "sig.der"), str(file)], capture_output=True, text=True)
    ver = subprocess.run(["openssl", "verify", "-CAfile", str(work / "root.pem"), "-purpose", "any",
                          str(work / "signing.pem")], capture_output=True, text=True)
    return dgst.returncode, ver.returncode


def _schema_valid(fw: dict[str, str]) -> None:
    ocpp_schemas.check("2.0.1", "UpdateFirmwareRequest", {"requestId": 1, "firmware": fw})


# -- profiles, setup -------------------------------------------------------------------------------------


def test_setup_is_idempotent_and_keys_stay_in_the_token(ctx: Context, maker: str) -> None:
    again = setup(ctx, maker)
    assert again.created == []
    root = ctx.engine.ca(ca_name_for(maker))
    assert root.row.profile == "mfr-root" and root.cert.subject == root.cert.issuer
    org_attr = root.cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)[0].value
    assert org_attr == maker  # the root is the manufacturer's own (ManufacturerRootCertificate)
    signing = x509.load_der_x509_certificate(again.signing.der)
    eku = signing.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CODE_SIGNING]
    ku = signing.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert again.signing.key_uri and again.signing.key_uri.startswith("pkcs11:")
    assert again.signing.tenant == maker


def test_version_order() -> None:
    ordered = ["0.9", "1.0.0-rc1", "1.0.0-rc2", "1.0.0", "1.0.0.1", "1.0.9", "1.0.10", "2.0", "10.0"]
    assert sorted(ordered, key=version_key) == ordered
    assert version_key("1.2.3") == version_key("v1.2.3")[1:] or version_key("1-2-3") == version_key("1.2.3")


def test_other_roles_cannot_have_firmware(ctx: Context) -> None:
    from pki.errors import Forbidden

    name = f"Not a maker {secrets.token_hex(3)}"
    create_org(ctx.db, name, "admin", [])
    with pytest.raises(Forbidden):
        setup(ctx, name)


# -- the CLI, openssl as the charger --------------------------------------------------------------------


def test_cli_sign_verifies_with_openssl_and_chains_to_the_root(ctx: Context, maker: str, image: Path,
                                                              tmp_path: Path) -> None:
    product = _product()
    env = cli_env(ctx)
    out = tmp_path / "fw.json"
    res = run_cli(["firmware", "sign", str(image), "--product", product, "--version", "1.0.0", "--org", maker,
                   "--location", "https://fw.example.com/charger-fw.bin", "--out", str(out)], env)
    assert res.returncode == 0, res.stderr
    fw = json.loads(out.read_text())
    _schema_valid(fw)
    assert set(fw) == {"location", "retrieveDateTime", "signingCertificate", "signature"}
    root = ctx.engine.ca(ca_name_for(maker)).cert
    assert _openssl_checks(tmp_path, fw, image, root) == (0, 0)
    # `firmware verify` checks what the station checks, from the JSON or from the parts.
    ok = run_cli(["firmware", "verify", str(image), "--json", str(out)], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "firmware signature OK" in ok.stdout
    ok2 = run_cli(["firmware", "verify", str(image), "--signature", fw["signature"], "--certificate",
                   str(tmp_path / "signing.pem"), "--root", str(tmp_path / "root.pem")], env)
    assert ok2.returncode == 0, ok2.stdout + ok2.stderr
    # Recorded: the signature row and the audit event (who, product, version, digest).
    import hashlib

    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    (row,) = _rows(ctx, product)
    assert row.sha256 == digest and row.size == image.stat().st_size and row.tenant == maker
    (ev,) = _events(ctx, f"{product}/1.0.0")
    assert ev.org == maker and ev.actor == f"cli:{maker}"
    assert ev.details["sha256"] == digest and ev.details["version"] == "1.0.0" and ev.details["product"] == product


def test_invalid_signature_and_wrong_image_are_refused(ctx: Context, maker: str, image: Path, tmp_path: Path) -> None:
    product = _product()
    fw = sign_digest(ctx, maker, product=product, version="1.0.0", location="fw.bin",
                     digest=__import__("hashlib").sha256(image.read_bytes()).digest()).firmware
    env = cli_env(ctx)
    root = ctx.engine.ca(ca_name_for(maker)).cert
    # invalid signature: one bit of s flipped
    sig = bytearray(base64.b64decode(fw["signature"]))
    sig[-1] ^= 0x01
    bad = dict(fw, signature=base64.b64encode(bytes(sig)).decode())
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    res = run_cli(["firmware", "verify", str(image), "--json", str(tmp_path / "bad.json")], env)
    assert res.returncode == 3 and "signature does not verify" in res.stdout, res.stdout + res.stderr
    assert _openssl_checks(tmp_path, bad, image, root)[0] != 0
    # wrong image: the right signature over another file
    other = tmp_path / "other.bin"
    data = image.read_bytes()
    other.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # always another file (a fixed 0x00 was not, 1 in 256)
    (tmp_path / "good.json").write_text(json.dumps(fw))
    res = run_cli(["firmware", "verify", str(other), "--json", str(tmp_path / "good.json")], env)
    assert res.returncode == 3 and "signature does not verify" in res.stdout
    assert _openssl_checks(tmp_path, fw, other, root)[0] != 0


def test_revoked_signing_certificate(ctx: Context, image: Path, tmp_path: Path) -> None:
    maker = _manufacturer(ctx, "revoked")
    product = _product()
    env = cli_env(ctx)
    out = tmp_path / "fw.json"
    assert run_cli(["firmware", "sign", str(image), "--product", product, "--version", "3.0", "--org", maker,
                    "--out", str(out)], env).returncode == 0
    cur = current_signing_certificate(ctx, maker)
    assert cur is not None
    ctx.engine.revoke(cur.serial, "keyCompromise", issuer=cur.issuer)
    res = run_cli(["firmware", "verify", str(image), "--json", str(out)], env)
    assert res.returncode == 3 and "revoked (keyCompromise)" in res.stdout, res.stdout
    # Nothing more is signed with it; setup replaces it with a certificate for a NEW key.
    res = run_cli(["firmware", "sign", str(image), "--product", product, "--version", "3.1", "--org", maker], env)
    assert res.returncode == 4 and "firmware setup" in res.stderr, res.stderr
    assert len(_rows(ctx, product)) == 1
    new = setup(ctx, maker)
    assert new.signing.serial != cur.serial and new.signing.key_uri != cur.key_uri
    assert run_cli(["firmware", "sign", str(image), "--product", product, "--version", "3.1", "--org", maker,
                    "--out", str(out)], env).returncode == 0
    assert run_cli(["firmware", "verify", str(image), "--json", str(out)], env).returncode == 0


def test_rollback_is_refused_unless_forced(ctx: Context, maker: str, image: Path) -> None:
    product = _product()
    env = cli_env(ctx)
    args = ["--product", product, "--org", maker]
    assert run_cli(["firmware", "sign", str(image), *args, "--version", "1.2.0"], env).returncode == 0
    res = run_cli(["firmware", "sign", str(image), *args, "--version", "1.1.9"], env)
    assert res.returncode == 3 and "rollback" in res.stderr and "1.2.0" in res.stderr, res.stderr
    assert _events(ctx, f"{product}/1.1.9") == []
    # the same version for a different image is refused too
    other = image.parent / "other-image.bin"
    other.write_bytes(b"another build")
    res = run_cli(["firmware", "sign", str(other), *args, "--version", "1.2.0"], env)
    assert res.returncode == 3, res.stderr
    # the same image and version again, and a higher version, are fine
    assert run_cli(["firmware", "sign", str(image), *args, "--version", "1.2.0"], env).returncode == 0
    assert run_cli(["firmware", "sign", str(image), *args, "--version", "1.10.0"], env).returncode == 0
    res = run_cli(["firmware", "sign", str(image), *args, "--version", "1.1.9", "--force"], env)
    assert res.returncode == 0, res.stderr
    (ev,) = _events(ctx, f"{product}/1.1.9")
    assert ev.details["forced"] is True
    assert [r.version for r in _rows(ctx, product)] == ["1.2.0", "1.2.0", "1.10.0", "1.1.9"]


def test_another_manufacturers_product_and_root(ctx: Context, maker: str, image: Path, tmp_path: Path) -> None:
    other = _manufacturer(ctx, "B")
    product = _product()
    env = cli_env(ctx)
    assert run_cli(["firmware", "sign", str(image), "--product", product, "--version", "1.0", "--org", maker],
                   env).returncode == 0
    res = run_cli(["firmware", "sign", str(image), "--product", product, "--version", "2.0", "--org", other], env)
    assert res.returncode == 3 and "another manufacturer" in res.stderr, res.stderr
    # B's own product, signed by B: a station of A (A's root installed) refuses it.
    out = tmp_path / "b.json"
    assert run_cli(["firmware", "sign", str(image), "--product", _product(), "--version", "1.0", "--org", other,
                    "--out", str(out)], env).returncode == 0
    (tmp_path / "root-a.pem").write_bytes(
        ctx.engine.ca(ca_name_for(maker)).cert.public_bytes(serialization.Encoding.PEM))
    res = run_cli(["firmware", "verify", str(image), "--json", str(out), "--root", str(tmp_path / "root-a.pem")], env)
    assert res.returncode == 3 and "not issued by the given Manufacturer root" in res.stdout, res.stdout
    fw = json.loads(out.read_text())
    assert _openssl_checks(tmp_path, fw, image, ctx.engine.ca(ca_name_for(maker)).cert)[1] != 0


# -- the API --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(ctx: Context, maker: str) -> Iterator[tuple[TestClient, dict[str, str]]]:
    from api.app import create_app

    key, _ = create_api_key(ctx.db, maker)
    with TestClient(create_app(ctx)) as client:
        yield client, {"Authorization": f"Bearer {key}"}


def test_api_digest_in_json(ctx: Context, api: tuple[TestClient, dict[str, str]], image: Path, tmp_path: Path,
                            maker: str) -> None:
    import hashlib

    client, auth = api
    product = _product()
    body = {"product": product, "version": "4.0.1", "sha256": hashlib.sha256(image.read_bytes()).hexdigest(),
            "location": "https://fw.example.com/x.bin", "installDateTime": "2030-01-01T02:00:00Z"}
    r = client.post("/v1/firmware/signatures", json=body, headers=auth)
    assert r.status_code == 201, r.text
    fw = r.json()["firmware"]
    _schema_valid(fw)
    assert fw["installDateTime"] == "2030-01-01T02:00:00Z"
    assert _openssl_checks(tmp_path, fw, image, ctx.engine.ca(ca_name_for(maker)).cert) == (0, 0)
    # rollback over the API: 409 problem, then forced
    r = client.post("/v1/firmware/signatures", json=dict(body, version="4.0.0"), headers=auth)
    assert r.status_code == 409 and r.json()["type"].endswith("/firmware-rollback"), r.text
    r = client.post("/v1/firmware/signatures", json=dict(body, version="4.0.0", force=True), headers=auth)
    assert r.status_code == 201
    (ev,) = _events(ctx, f"{product}/4.0.1")
    assert ev.actor.startswith("apikey:")


def test_api_streamed_image(ctx: Context, api: tuple[TestClient, dict[str, str]], image: Path, tmp_path: Path,
                            maker: str) -> None:
    client, auth = api
    product = _product()

    def chunks() -> Iterator[bytes]:
        with image.open("rb") as f:
            while block := f.read(256 * 1024):
                yield block

    r = client.post("/v1/firmware/signatures", content=chunks(), headers={
        **auth, "content-type": "application/octet-stream"},
        params={"product": product, "version": "1.0", "location": "https://fw.example.com/y.bin"})
    assert r.status_code == 201, r.text
    fw = r.json()["firmware"]
    _schema_valid(fw)
    assert _openssl_checks(tmp_path, fw, image, ctx.engine.ca(ca_name_for(maker)).cert) == (0, 0)
    (row,) = _rows(ctx, product)
    assert row.size == image.stat().st_size
    # the 64 KiB body limit still holds for JSON on this route, and for other routes
    r = client.post("/v1/firmware/signatures", content=b"{" + b" " * (70 * 1024) + b"}",
                    headers={**auth, "content-type": "application/json"})
    assert r.status_code == 413


def test_api_roles(ctx: Context, api: tuple[TestClient, dict[str, str]]) -> None:
    client, _ = api
    name = f"Fw CPO {secrets.token_hex(3)}"
    create_org(ctx.db, name, "auditor", [])
    key, _ = create_api_key(ctx.db, name)
    r = client.post("/v1/firmware/signatures", json={"product": "x", "version": "1", "sha256": "0" * 64,
                                                      "location": "x"}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403, r.text


def _raw_post(app: Any, path: str, query: str, headers: list[tuple[bytes, bytes]],
              messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drive the ASGI app directly: the request body arrives as ``messages`` (ending in a disconnect when
    the client went away), as uvicorn would hand them over."""
    sent: list[dict[str, Any]] = []
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 5555), "server": ("testserver", 80)}

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception:  # noqa: BLE001 - a disconnected client may leave the app raising; what matters is below
            pass

    asyncio.run(run())
    return sent


def test_interrupted_upload_signs_nothing(ctx: Context, api: tuple[TestClient, dict[str, str]], maker: str) -> None:
    client, auth = api
    app = client.app
    product = _product()
    query = f"product={product}&version=9.9&location=x.bin"
    headers = [(b"authorization", auth["Authorization"].encode()), (b"content-type", b"application/octet-stream"),
               (b"content-length", str(10 * 1024 * 1024).encode())]
    chunk = os.urandom(64 * 1024)
    # 1. the client disconnects after 1 MiB of a declared 10 MiB
    msgs = [{"type": "http.request", "body": chunk, "more_body": True} for _ in range(16)]
    msgs.append({"type": "http.disconnect"})
    _raw_post(app, "/v1/firmware/signatures", query, headers, msgs)
    # 2. the body ends early (a proxy that cut it short): refused as incomplete
    msgs = [{"type": "http.request", "body": chunk, "more_body": True} for _ in range(3)]
    msgs.append({"type": "http.request", "body": b"", "more_body": False})
    sent = _raw_post(app, "/v1/firmware/signatures", query, headers, msgs)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 409
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b"nothing was signed" in body
    assert _rows(ctx, product) == [] and _events(ctx, f"{product}/9.9") == []
    # the same upload, complete, is signed once
    msgs = [{"type": "http.request", "body": chunk, "more_body": True} for _ in range(160)]
    msgs.append({"type": "http.request", "body": b"", "more_body": False})
    sent = _raw_post(app, "/v1/firmware/signatures", query, headers, msgs)
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 201
    assert len(_rows(ctx, product)) == 1 and len(_events(ctx, f"{product}/9.9")) == 1
