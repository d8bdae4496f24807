"""Every certificate type the engine issues, checked field by field against its profile, verified by
`openssl verify -x509_strict` up to its root, and linted by the pkilint command-line tools.

Covers the CAs `v2gpki init` creates (ISO 15118-2 P-256, -20 P-521 and the -20 Ed448 hierarchy, the
OCPP CSMS root), the service leaves init issues (delegated OCSP signers, CPS leaves) and leaves issued
from CSRs for every end-entity profile, -20 ones from both P-521 and Ed448 CSRs. Also: CA private keys
cannot leave the token.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import core
from asn1crypto import x509 as ax
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, x448
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_der_public_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters
from sqlmodel import select

from hsm.errors import HSMError
from hsm.keystore import KeyAlg
from hsm.pkcs11 import Pkcs11KeyStore
from hsm.uri import key_label
from pki.context import Context
from pki.issuance import pem
from pki.profiles import Profile
from pki.store.models import Certificate, IssuanceIntent
from tests.conftest import csr_pem

# pkilint's console scripts sit beside the interpreter running the suite (the clone's .venv): never a
# path outside the clone (issue #29).
VENV_BIN = Path(sys.executable).parent
# The one pkilint finding we accept: single-label DCs such as DC=V2G, which the ISO 15118 profiles
# require, are not valid DNS names for pkilint. Exactly this code, nothing broader.
ALLOWED_PKILINT = "pkix.name_domain_components_invalid_domain_name"

SIG_OID = {  # RFC 5758 §3.2 (ecdsa-with-SHA256/512), RFC 8410 §3 (id-Ed448)
    KeyAlg.P256: "1.2.840.10045.4.3.2",
    KeyAlg.P521: "1.2.840.10045.4.3.4",
    KeyAlg.ED448: "1.3.101.113",
}
_KU_FIELDS = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
              "key_agreement", "key_cert_sign", "crl_sign")
_EKU = {"clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH, "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
        "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING, "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING}
# ASN.1 universal tags of the subject attribute strings ([V2G2-xxx] profiles: CN/O UTF8String,
# C PrintableString (RFC 5280 §4.1.2.4 / X.520), DC IA5String (RFC 4519 §2.4)).
_STRING_TAG = {"2.5.4.3": 12, "2.5.4.10": 12, "2.5.4.6": 19, "0.9.2342.19200300.100.1.25": 22}


@dataclass
class Item:
    label: str
    cert: x509.Certificate
    der: bytes
    profile: Profile
    issuer: str | None  # issuing CA name, None for a self-signed root
    issuer_alg: KeyAlg
    chain: list[x509.Certificate]  # issuing CA up to its root (empty for a root)


# (label, profile, CN, DC, O, key alg, issuing CA to request or None, expected issuer)
LEAVES: list[tuple[str, str, str, str | None, str | None, KeyAlg, str | None, str]] = [
    ("secc", "secc", "DE*ICE*E45B*78C", "CPO", "Test CPO", KeyAlg.P256, None, "cpo-sub2"),
    ("secc-seccid", "secc", "DE-ICE-S-00003C4D557878675645330967543476-2", "CPO", "Test CPO", KeyAlg.P256,
     None, "cpo-sub2"),
    ("oem-prov", "oem-prov", "WP012345678901234", "OEM", "Test OEM", KeyAlg.P256, None, "oem-sub2"),
    ("contract", "contract", "DE-8AA-1A2B3C4D5-X", "MO", "Test eMSP", KeyAlg.P256, None, "mo-sub2"),
    ("cs-client", "cs-client", "CS-0001", None, "Test CPO", KeyAlg.P256, None, "csms-root"),
    ("csms-server", "csms-server", "csms.example.com", None, None, KeyAlg.P256, None, "csms-root"),
    ("api-client", "api-client", "ops-tool", None, "Test CPO", KeyAlg.P256, None, "csms-root"),
    ("cps-leaf", "cps-leaf", "CPS Leaf Test", "CPS", "Test CPS", KeyAlg.P256, None, "cps-sub2"),
    ("ocsp-signer", "ocsp-signer", "OCSP CPO Sub-CA 2", None, "Test CPO", KeyAlg.P256, "cpo-sub2", "cpo-sub2"),
]
for _alg, _sfx in ((KeyAlg.P521, ""), (KeyAlg.ED448, "-ed448")):
    LEAVES += [
        (f"secc-20-{_alg.value}", "secc-20", "DE*ICE*E45B*78C", "CPO", "Test CPO", _alg, None, f"cpo-sub2-20{_sfx}"),
        (f"oem-prov-20-{_alg.value}", "oem-prov-20", "WP012345678901234", "OEM", "Test OEM", _alg, None,
         f"oem-sub2-20{_sfx}"),  # an Ed448 OEM -20 hierarchy exists since #26
        (f"contract-20-{_alg.value}", "contract-20", "DE8AA1A2B3C4D5", "MO", "Test eMSP", _alg, None,
         f"mo-sub2-20{_sfx}"),
        (f"cps-leaf-20-{_alg.value}", "cps-leaf-20", "CPS Leaf Test 20", "CPS", "Test CPS", _alg, None,
         f"cps-sub2-20{_sfx}"),  # and an Ed448 CPS one
        (f"ocsp-signer-20-{_alg.value}", "ocsp-signer-20", "OCSP MO Sub-CA 2 20", None, "Test eMSP", _alg,
         f"mo-sub2-20{_sfx}", f"mo-sub2-20{_sfx}"),
    ]


def _key(alg: KeyAlg) -> ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey:
    if alg is KeyAlg.ED448:
        return ed448.Ed448PrivateKey.generate()
    return ec.generate_private_key(ec.SECP521R1() if alg is KeyAlg.P521 else ec.SECP256R1())


def csr_extras(profile: str, alg: KeyAlg) -> list[x509.ExtensionType]:
    """An Ed448 vehicle's CSR requests its X448 key (ISO 15118-20 [V2G20-2534], docs/profiles.md)."""
    if profile != "oem-prov-20" or alg is not KeyAlg.ED448:
        return []
    spki = x448.X448PrivateKey.generate().public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return [x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.72"), spki)]


_COLLECTED: dict[int, list[Item]] = {}


def collect(ctx: Context) -> list[Item]:
    """All CA certificates, init's service certificates, and one fresh leaf per LEAVES row (issued once
    per context and cached: the context is session-scoped)."""
    if id(ctx) in _COLLECTED:
        return _COLLECTED[id(ctx)]
    eng = ctx.engine
    hierarchy = ctx.hierarchy()
    items: list[Item] = []
    # The CAs `v2gpki init` made (other tests may add CAs of their own to the shared context).
    for entry in hierarchy.cas:
        h = eng.ca(entry.name)
        parent = h.row.parent
        items.append(Item(f"ca:{h.name}", h.cert, h.row.der, ctx.profiles.get(h.row.profile), parent,
                          eng.ca(parent).alg if parent else h.alg, eng.chain(parent) if parent else []))
    service_ids = {f"ocsp-{c.name}" for c in hierarchy.cas if c.ocsp_signer} | {sk.name for sk in
                                                                                 hierarchy.service_keys}
    latest: dict[str, Certificate] = {}
    with ctx.db.session() as s:
        for r in s.exec(select(Certificate).order_by(Certificate.id)):  # type: ignore[arg-type]
            if r.identifier in service_ids and r.key_uri is not None:
                latest[r.identifier] = r  # the newest, should another test have renewed one
    assert set(latest) == service_ids, "init did not issue every service certificate"
    for r in latest.values():
        items.append(Item(f"svc:{r.identifier}", x509.load_der_x509_certificate(r.der), r.der,
                          ctx.profiles.get(r.profile), r.issuer, eng.ca(r.issuer).alg, eng.chain(r.issuer)))
    for label, prof, cn, dc, o, alg, ca, expect_issuer in LEAVES:
        issued = eng.issue_from_csr(prof, csr_pem(cn, o=o, dc=dc, key=_key(alg), extensions=csr_extras(prof, alg)),
                                    ca=ca, actor="test")
        assert issued.issuer == expect_issuer, (label, issued.issuer)
        items.append(Item(f"leaf:{label}", issued.cert, issued.der, ctx.profiles.get(prof), issued.issuer,
                          eng.ca(issued.issuer).alg, eng.chain(issued.issuer)))
    # Signed firmware (#27 item 3): a manufacturer's root and firmware-signing certificate, made by
    # `v2gpki firmware setup` for a manufacturer tenant rather than by init (one root per manufacturer).
    from pki.firmware import setup as firmware_setup
    from pki.orgs import create_org

    mfr = f"Profiles Mfr {secrets.token_hex(3)}"
    create_org(ctx.db, mfr, "manufacturer", [])
    fw = firmware_setup(ctx, mfr)
    h = eng.ca(fw.ca)
    items.append(Item(f"ca:{h.name}", h.cert, h.row.der, ctx.profiles.get("mfr-root"), None, h.alg, []))
    items.append(Item("leaf:firmware-signing", x509.load_der_x509_certificate(fw.signing.der), fw.signing.der,
                      ctx.profiles.get("firmware-signing"), fw.ca, h.alg, eng.chain(fw.ca)))
    _COLLECTED[id(ctx)] = items
    return items


@pytest.fixture()
def items(ctx: Context) -> list[Item]:
    return collect(ctx)


def test_collection_covers_every_profile(ctx: Context, items: list[Item]) -> None:
    """Every profile of policies/ is exercised (a new profile without a test here fails)."""
    covered = {it.profile.name for it in items}
    assert covered == set(ctx.profiles.names())
    algs = {(it.profile.standard, it.issuer_alg) for it in items}
    assert {("iso15118-20", KeyAlg.P521), ("iso15118-20", KeyAlg.ED448), ("iso15118-2", KeyAlg.P256)} <= algs
    # Leaves from Ed448 and P-521 CSRs, under Ed448 and P-521 issuers.
    leaf_keys = [it.cert.public_key() for it in items if it.label.startswith("leaf:")]
    assert sum(isinstance(k, ed448.Ed448PublicKey) for k in leaf_keys) == 5
    assert sum(isinstance(k, ec.EllipticCurvePublicKey) and k.curve.name == "secp521r1" for k in leaf_keys) == 5


# -- openssl ------------------------------------------------------------------------------------------


def _openssl_verify(it: Item, d: Path) -> tuple[str, int, str]:
    root = it.chain[-1] if it.chain else it.cert
    (d / "root.pem").write_text(pem(root))
    (d / "cert.pem").write_text(pem(it.cert))
    cmd = ["openssl", "verify", "-x509_strict", "-CAfile", str(d / "root.pem")]
    if len(it.chain) > 1:
        (d / "untrusted.pem").write_text("".join(pem(c) for c in it.chain[:-1]))
        cmd += ["-untrusted", str(d / "untrusted.pem")]
    res = subprocess.run([*cmd, str(d / "cert.pem")], capture_output=True, text=True)
    return it.label, res.returncode, res.stdout + res.stderr


def test_openssl_verify_x509_strict(items: list[Item], tmp_path: Path) -> None:
    failures = []
    for n, it in enumerate(items):
        d = tmp_path / str(n)
        d.mkdir()
        label, rc, out = _openssl_verify(it, d)
        if rc != 0 or ": OK" not in out:
            failures.append(f"{label}: {out.strip()}")
    assert not failures, "\n".join(failures)


# -- profile fields -----------------------------------------------------------------------------------


def _expected_sig_alg(it: Item) -> KeyAlg:
    return it.issuer_alg


def _check_subject(it: Item, failures: list[str]) -> None:
    p = it.profile
    an = ax.Certificate.load(it.der)["tbs_certificate"]["subject"]
    order = []
    for rdn in an.chosen:
        if len(rdn) != 1:
            failures.append(f"{it.label}: multi-valued RDN")
        for atv in rdn:
            oid = atv["type"].dotted
            order.append(oid)
            v = atv["value"]
            if isinstance(v, core.Choice):
                v = v.chosen
            if _STRING_TAG.get(oid) != v.tag:
                failures.append(f"{it.label}: {oid} encoded with tag {v.tag}")
    # RDN order CN, O, C, DC (the order of the public ISO 15118 test PKIs).
    want_order = [o for o in ("2.5.4.3", "2.5.4.10", "2.5.4.6", "0.9.2342.19200300.100.1.25") if o in order]
    if order != want_order:
        failures.append(f"{it.label}: subject RDN order {order}")
    dcs = [a.value for a in it.cert.subject.get_attributes_for_oid(NameOID.DOMAIN_COMPONENT)]
    if dcs != ([p.subject.dc] if p.subject.dc else []):
        failures.append(f"{it.label}: DC {dcs} != profile {p.subject.dc}")  # [V2G2-925] DC=CPO etc.
    cns = it.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        failures.append(f"{it.label}: needs exactly one CN")
    if p.subject.cn == "emaid" and "-" in str(cns[0].value):
        failures.append(f"{it.label}: EMAID not normalised")
    if p.subject.o == "required" and not it.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME):
        failures.append(f"{it.label}: O missing")


def _check_extensions(it: Item, failures: list[str], public_url: str) -> None:
    p, cert = it.profile, it.cert
    exts = {e.oid: e for e in cert.extensions}
    expected = {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
                ExtensionOID.AUTHORITY_KEY_IDENTIFIER}
    bc = exts[ExtensionOID.BASIC_CONSTRAINTS]
    # basicConstraints critical, pathLen on every sub-CA so EV stacks can tell Sub-CA 1 from 2.
    assert isinstance(bc.value, x509.BasicConstraints)
    if not bc.critical or bc.value.ca != p.ca or bc.value.path_length != p.path_len:
        failures.append(f"{it.label}: basicConstraints {bc}")
    if p.ca and not p.self_signed and bc.value.path_length is None:
        failures.append(f"{it.label}: sub-CA without pathLen")
    ku = exts[ExtensionOID.KEY_USAGE]
    assert isinstance(ku.value, x509.KeyUsage)
    have = {f for f in _KU_FIELDS if getattr(ku.value, f)}
    # RFC 8410 §5: an Ed448 subject key carries the profile's signature bits only.
    want = set(p.key_usage) - ({"key_agreement", "key_encipherment", "data_encipherment"}
                               if isinstance(cert.public_key(), ed448.Ed448PublicKey) else set())
    if not ku.critical or have != want:
        failures.append(f"{it.label}: keyUsage {sorted(have)} critical={ku.critical}, want {sorted(want)}")
    # RFC 5280 §4.2.1.2 / §4.2.1.1: SKI = SHA-1 of the key (method 1), AKI keyIdentifier only, non-critical.
    ski = exts[ExtensionOID.SUBJECT_KEY_IDENTIFIER]
    assert isinstance(ski.value, x509.SubjectKeyIdentifier)
    if ski.critical or ski.value.digest != x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest:
        failures.append(f"{it.label}: SKI")
    aki = exts[ExtensionOID.AUTHORITY_KEY_IDENTIFIER]
    assert isinstance(aki.value, x509.AuthorityKeyIdentifier)
    issuer_cert = it.chain[0] if it.chain else cert
    issuer_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    if (aki.critical or aki.value.key_identifier != issuer_ski or aki.value.authority_cert_issuer is not None
            or aki.value.authority_cert_serial_number is not None):
        failures.append(f"{it.label}: AKI")
    if p.aia_ocsp:
        expected.add(ExtensionOID.AUTHORITY_INFORMATION_ACCESS)
        aia = exts.get(ExtensionOID.AUTHORITY_INFORMATION_ACCESS)
        if aia is None or aia.critical or [(d.access_method, d.access_location.value) for d in aia.value] != [
                (x509.oid.AuthorityInformationAccessOID.OCSP, f"{public_url}/ocsp")]:
            failures.append(f"{it.label}: AIA {aia}")
    if p.crldp and not p.self_signed:
        expected.add(ExtensionOID.CRL_DISTRIBUTION_POINTS)
        cdp = exts.get(ExtensionOID.CRL_DISTRIBUTION_POINTS)
        if cdp is None or cdp.critical or [n.value for dp in cdp.value for n in dp.full_name] != [
                f"{public_url}/crl/{it.issuer}.crl"]:
            failures.append(f"{it.label}: CRLDP {cdp}")
    if p.extended_key_usage:
        expected.add(ExtensionOID.EXTENDED_KEY_USAGE)
        eku = exts.get(ExtensionOID.EXTENDED_KEY_USAGE)
        if eku is None or eku.critical != p.eku_critical or list(eku.value) != [
                _EKU[e] for e in p.extended_key_usage]:
            failures.append(f"{it.label}: EKU {eku}")
    if p.ocsp_nocheck:
        expected.add(ExtensionOID.OCSP_NO_CHECK)  # RFC 6960 §4.2.2.2.1
    if p.san_dns_from_cn:
        expected.add(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        san = exts[ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        if san.critical or san.value.get_values_for_type(x509.DNSName) != [cn]:
            failures.append(f"{it.label}: SAN {san}")
    if p.x448_alt_key_for_ed448 and isinstance(cert.public_key(), ed448.Ed448PublicKey):
        # the one CSR extension a profile copies: the -20 X448 Alternate Subject Public Key [V2G20-2534]
        alt_oid = x509.ObjectIdentifier("2.5.29.72")
        expected.add(alt_oid)
        alt = exts.get(alt_oid)
        if alt is None or alt.critical or not isinstance(alt.value, x509.UnrecognizedExtension) or not isinstance(
                load_der_public_key(alt.value.value), x448.X448PublicKey):
            failures.append(f"{it.label}: subjectAltPublicKeyInfo {alt}")
    if set(exts) != expected:  # nothing copied from a CSR, nothing the profile does not list
        failures.append(f"{it.label}: extensions {sorted(o.dotted_string for o in set(exts) ^ expected)} "
                        "differ from the profile")


def test_profile_fields(ctx: Context, items: list[Item]) -> None:
    failures: list[str] = []
    serials: set[tuple[str, int]] = set()
    for it in items:
        p, cert = it.profile, it.cert
        if cert.version is not x509.Version.v3:
            failures.append(f"{it.label}: not v3")
        # Key algorithm of the subject matches the profile (-2: P-256 only [V2G2-007]).
        pk = cert.public_key()
        alg = KeyAlg.ED448 if isinstance(pk, ed448.Ed448PublicKey) else (
            KeyAlg.P521 if isinstance(pk, ec.EllipticCurvePublicKey) and pk.curve.name == "secp521r1"
            else KeyAlg.P256)
        if alg not in p.key_algs:
            failures.append(f"{it.label}: {alg} key")
        # Signature: ecdsa-with-SHA256 for -2 [V2G2-006], SHA-512 with P-521, pure Ed448 (RFC 8410);
        # TBS signature field equal to the outer one and no parameters (RFC 5758 §3.2, RFC 8410 §3).
        ac = ax.Certificate.load(it.der)
        outer, inner = ac["signature_algorithm"], ac["tbs_certificate"]["signature"]
        if cert.signature_algorithm_oid.dotted_string != SIG_OID[_expected_sig_alg(it)] or \
                outer.dump() != inner.dump() or outer["parameters"].native is not None:
            failures.append(f"{it.label}: signature algorithm {cert.signature_algorithm_oid.dotted_string}")
        if p.standard == "iso15118-2" and alg is not KeyAlg.P256:
            failures.append(f"{it.label}: -2 profile with {alg}")
        # Size: ≤ 800 bytes for -2 [V2G2-010], ≤ 1600 for -20, and the profile's own limit.
        limit = {"iso15118-2": 800, "iso15118-20": 1600}.get(p.standard, p.max_der_size)
        if len(it.der) > min(limit, p.max_der_size):
            failures.append(f"{it.label}: {len(it.der)} bytes > {limit}")
        # Serial: positive, ≤ 16 octets (OCPP's 40-character serialNumber), ≥ 64 bits of CSPRNG output.
        content = ac["tbs_certificate"]["serial_number"].contents
        sn = cert.serial_number
        if not (sn > 0 and len(content) <= 16 and content[0] < 0x80 and sn.bit_length() >= 64):
            failures.append(f"{it.label}: serial {sn:x} ({len(content)} octets)")
        key = (cert.issuer.rfc4514_string(), sn)
        if key in serials:
            failures.append(f"{it.label}: serial reused under one issuer")
        serials.add(key)
        # Issuer name / validity: never outlives the issuer (RFC 5280 §6.1.3 would otherwise fail later).
        issuer_cert = it.chain[0] if it.chain else cert
        if cert.issuer != issuer_cert.subject:
            failures.append(f"{it.label}: issuer name")
        want_na = min(cert.not_valid_before_utc + timedelta(days=p.validity_days), issuer_cert.not_valid_after_utc)
        if cert.not_valid_after_utc != want_na:
            failures.append(f"{it.label}: notAfter {cert.not_valid_after_utc} != {want_na}")
        _check_subject(it, failures)
        _check_extensions(it, failures, ctx.settings.public_base())
    assert not failures, "\n".join(failures)


def test_leaves_are_stored(ctx: Context, items: list[Item]) -> None:
    """Each leaf has its row (issued, valid, same DER) and a completed intent."""
    with ctx.db.session() as s:
        for it in items:
            if not it.label.startswith("leaf:"):
                continue
            serial = format(it.cert.serial_number, "x")
            row = s.exec(select(Certificate).where(Certificate.serial == serial)).one()
            assert row.der == it.der and row.status == "valid" and row.issuer == it.issuer
            assert row.fingerprint == hashlib.sha256(it.der).hexdigest()
            intent = s.exec(select(IssuanceIntent).where(IssuanceIntent.serial == serial)).one()
            assert intent.state == "issued"


# -- pkilint CLI ---------------------------------------------------------------------------------------

# Runs the `main(argv)` of each pkilint command-line tool — exactly what the console scripts beside
# sys.executable call — once per argv in ONE interpreter: starting the interpreter and importing pkilint costs
# ~0.4 s per run, which for ~160 runs would dominate the suite. test_pkilint_batch_matches_console_scripts
# checks that this driver and the console scripts report the same thing.
_DRIVER = """
import contextlib, io, json, sys
from pkilint.bin import lint_pkix_cert, lint_pkix_signer_signee_cert_chain
mains = {"lint_pkix_cert": lint_pkix_cert.main,
         "lint_pkix_signer_signee_cert_chain": lint_pkix_signer_signee_cert_chain.main}
for line in sys.stdin:
    job = json.loads(line)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = mains[job["tool"]](job["argv"])
    print(json.dumps({"rc": rc, "out": buf.getvalue()}), flush=True)
"""


@dataclass
class LintJob:
    label: str
    tool: str  # lint_pkix_cert | lint_pkix_signer_signee_cert_chain
    files: list[str]
    subject_has_dc: bool

    @property
    def argv(self) -> list[str]:
        # usage: lint [-s SEVERITY] [-f FORMAT] file | issuer subject
        return ["lint", "-s", "ERROR", "-f", "JSON", *self.files]


def _findings(label: str, rc: int, stdout: str) -> list[dict[str, str]]:
    assert stdout.strip(), f"{label}: no output (rc {rc})"
    out = json.loads(stdout)
    findings = [{"code": fd["code"], "severity": fd["severity"], "message": fd.get("message") or "",
                 "at": r["node_path"]} for r in out["results"] for fd in r["finding_descriptions"]]
    # The tools exit non-zero exactly when they report findings at or above -s.
    assert (rc == 0) == (not findings), (label, rc, findings)
    return findings


def _run_batch(jobs: list[LintJob]) -> list[list[dict[str, str]]]:
    feed = "".join(json.dumps({"tool": j.tool, "argv": j.argv}) + "\n" for j in jobs)
    res = subprocess.run([str(VENV_BIN / "python"), "-c", _DRIVER], input=feed, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == len(jobs), res.stderr
    return [_findings(j.label, r["rc"], r["out"]) for j, r in zip(jobs, map(json.loads, lines), strict=True)]


def _run_console_script(job: LintJob) -> list[dict[str, str]]:
    res = subprocess.run([str(VENV_BIN / job.tool), *job.argv], capture_output=True, text=True)
    return _findings(job.label, res.returncode, res.stdout)


def _lint_jobs(items: list[Item], d: Path) -> list[LintJob]:
    """One job per certificate and one per issuer/subject pair (a root is its own issuer)."""
    jobs = []
    for n, it in enumerate(items):
        f = d / f"{n}.pem"
        f.write_text(pem(it.cert))
        issuer = d / f"{n}-issuer.pem"
        issuer.write_text(pem(it.chain[0] if it.chain else it.cert))
        has_dc = bool(it.cert.subject.get_attributes_for_oid(NameOID.DOMAIN_COMPONENT))
        jobs.append(LintJob(it.label, "lint_pkix_cert", [str(f)], has_dc))
        # The pair linter checks name chaining, AKI/SKI and the signature; names are the other run's job.
        jobs.append(LintJob(f"{it.label} issued by {it.issuer or 'itself'}", "lint_pkix_signer_signee_cert_chain",
                            [str(issuer), str(f)], False))
    return jobs


def _bad(jobs: list[LintJob], results: list[list[dict[str, str]]]) -> tuple[list[str], int]:
    failures, allowed_seen = [], 0
    for job, findings in zip(jobs, results, strict=True):
        for f in findings:
            if f["code"] == ALLOWED_PKILINT and job.subject_has_dc:
                allowed_seen += 1
                continue
            failures.append(f"{job.label}: {f['severity']} {f['code']} {f['message']} at {f['at']}")
    return failures, allowed_seen


def test_pkilint_cli_reports_no_errors(sqlite_ctx: Context, tmp_path: Path) -> None:
    """pkilint's RFC 5280 linters (`-s ERROR`) on every issued certificate and each issuer/subject pair.

    Run on one backend: the database takes no part in building a certificate. The only finding let
    through is ALLOWED_PKILINT, and only on certificates whose subject has a DC.
    """
    jobs = _lint_jobs(collect(sqlite_ctx), tmp_path)
    failures, allowed_seen = _bad(jobs, _run_batch(jobs))
    assert not failures, "\n".join(failures)
    # The filter is not vacuous: every certificate with a DC did raise exactly that finding.
    assert allowed_seen == sum(j.subject_has_dc for j in jobs)


def test_pkilint_batch_matches_console_scripts(sqlite_ctx: Context, tmp_path: Path) -> None:
    """The installed console scripts, run one by one on a sample (-2 root, -20 Ed448 and P-521 leaves,
    a certificate without DC), report what the batch driver reports."""
    items = collect(sqlite_ctx)
    wanted = {"ca:v2g-root", "leaf:secc-20-ed448", "leaf:contract-20-p521", "leaf:csms-server"}
    jobs = [j for j in _lint_jobs(items, tmp_path) if j.label.split(" issued by ")[0] in wanted]
    assert len(jobs) == 2 * len(wanted)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        one_by_one = list(pool.map(_run_console_script, jobs))
    assert one_by_one == _run_batch(jobs)
    assert any(f["code"] == ALLOWED_PKILINT for fs in one_by_one for f in fs)


# -- private keys stay in the token ---------------------------------------------------------------------


def _wrap_with_aes_key_wrap_pad(label: str) -> Callable[[Any], bytes]:
    def go(session: Any) -> bytes:
        wrapping = session.generate_key(KeyType.AES, 256, store=False, template={Attribute.WRAP: True})
        try:
            priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
            return bytes(wrapping.wrap_key(priv, mechanism=Mechanism.AES_KEY_WRAP_PAD))
        finally:
            wrapping.destroy()

    return go


def _control_wrap(session: Any) -> int:
    """The same wrap of an *extractable* session key succeeds: the refusals below are the key policy."""
    wrapping = session.generate_key(KeyType.AES, 256, store=False, template={Attribute.WRAP: True})
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
    pub, priv = params.generate_keypair(store=False, private_template={Attribute.EXTRACTABLE: True})
    try:
        return len(wrapping.wrap_key(priv, mechanism=Mechanism.AES_KEY_WRAP_PAD))
    finally:
        for o in (wrapping, priv, pub):
            o.destroy()


def test_ca_private_keys_cannot_leave_the_token(ctx: Context) -> None:
    ks = ctx.keystore
    assert isinstance(ks, Pkcs11KeyStore)
    assert ks.session_call(_control_wrap) > 0
    for entry in ctx.hierarchy().cas:
        h = ctx.engine.ca(entry.name)
        label = key_label(h.row.key_uri)
        assert ks.private_attribute(label, Attribute.SENSITIVE) is True
        assert ks.private_attribute(label, Attribute.EXTRACTABLE) is False
        # Generated inside the token and never extractable since (PKCS#11 v2.40 §4.9).
        assert ks.private_attribute(label, Attribute.ALWAYS_SENSITIVE) is True
        assert ks.private_attribute(label, Attribute.NEVER_EXTRACTABLE) is True
        with pytest.raises(p11e.AttributeSensitive):
            ks.private_attribute(label, Attribute.VALUE)
        with pytest.raises(p11e.KeyUnextractable):
            ks.session_call(_wrap_with_aes_key_wrap_pad(label))
        # Nor through the cryptography object the engine signs with.
        with pytest.raises(HSMError, match="not extractable"):
            ks.signer(ks.uri(label)).private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
