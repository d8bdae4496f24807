"""Signed, versioned trust lists (V2G, MO, OEM, CSMS) and their file layouts for EVerest and Josev.

A trust list is a JSON document (format ``v2gpki-trustlist/1``, docs/trustlist.md) naming the trust
anchors of one store with their intended use and validity, the intermediates for chain building, the
cross-certificates of a root rollover and the CAs no longer trusted; it carries a version, its issue time
and nextUpdate. It is signed twice over the exact bytes, both by the trust-list signer key ``svc-truststore``
held in the HSM, whose certificate is issued by the CSMS root (a V2G root never issues a leaf [V2G2-867]):

* ``trustlist.json.sig`` — DER ECDSA-SHA256 (RFC 5480/X9.62), checkable with ``openssl dgst -verify``;
* ``trustlist.jws`` — a JWS with detached payload (RFC 7515 §7.1 compact form, Appendix F), header ``x5c``
  holding the signer chain (RFC 7515 §4.1.6), alg ES256 (RFC 7518 §3.4).

A version is published when the content (anchors, intermediates, cross-certificates, distrusted CAs)
changes, or before nextUpdate; (store, version) is unique, so concurrent publishers cannot both win.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from hsm.algorithms import algorithm_of
from pki import audit
from pki.errors import NotFound, PKIError, TrustListError
from pki.store import subscriptions as dist
from pki.store.db import Session, utcnow
from pki.store.inventory import Inventory
from pki.store.models import CertificateAuthority
from pki.store.models_lifecycle import TrustStoreVersion

if TYPE_CHECKING:
    from pki.context import Context

log = logging.getLogger("v2gpki.trustlist")

FORMAT = "v2gpki-trustlist/1"
STORES = ("v2g", "mo", "oem", "csms")
SIGNER_ID = "truststore-signer"
SIGNER_LABEL = "svc-truststore"

# What a relying party uses each anchor for (ISO 15118-2 §7.9.2 / -20 PKI; OCPP 2.0.1 A00 security).
INTENDED_USE: dict[str, list[str]] = {
    "v2g": ["iso15118 TLS: EVCC validates the SECC certificate chain",
            "iso15118 CertificateInstallation/Update: EV validates the CPS signature chain"],
    "mo": ["iso15118 Plug & Charge: SECC/CSMS validate contract certificate chains (AuthorizeRequest)",
           "SalesTariff signatures by MO Sub-CA 2"],
    "oem": ["iso15118 CertificateInstallation: CPS validates the OEM provisioning certificate chain"],
    "csms": ["OCPP security profiles 2/3: charging station validates the CSMS server certificate",
             "CSMS validates ChargingStationCertificate (client TLS)",
             "verifies the signer of these trust lists"],
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# -- signer ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signer:
    key_uri: str  # hsm/uri.py; the key store's signer(key_uri) signs
    cert: x509.Certificate
    chain: list[x509.Certificate]  # signer first, up to the root

    def chain_pem(self) -> str:
        return "".join(_pem(c) for c in self.chain)


def current_signer(ctx: Context) -> Signer | None:

    row = Inventory(ctx.db).newest_held_certificate(SIGNER_ID, utcnow())
    if row is None or row.key_uri is None:
        return None
    cert = x509.load_der_x509_certificate(row.der)
    return Signer(row.key_uri, cert, [cert, *ctx.lifecycle.engine.chain(row.issuer)])


def ensure_signer(ctx: Context) -> Signer:
    """The trust-list signer; issued (key `svc-truststore` in the HSM) on first use."""
    from hsm.errors import KeyExistsError, KeyNotFoundError
    from pki.hierarchy import issue_service_cert
    sg = current_signer(ctx)
    if sg is not None:
        return sg
    lc = ctx.lifecycle
    ts = lc.policy.truststore
    h = ctx.hierarchy()
    try:
        ctx.keystore.public_key(SIGNER_LABEL)
    except KeyNotFoundError:
        try:
            ctx.keystore.create_key(SIGNER_LABEL, lc.engine.ca(ts.signer_issuer).alg)
        except KeyExistsError:  # another process created it meanwhile
            pass
    issue_service_cert(lc.engine, issuer=ts.signer_issuer, profile_name=ts.signer_profile, label=SIGNER_LABEL,
                       cn=f"{h.organization} Trust List Signer", h=h, identifier=SIGNER_ID)
    sg = current_signer(ctx)
    if sg is None:
        raise PKIError("trust-list signer was issued but cannot be found")
    return sg


def _jws_alg(cert: x509.Certificate) -> tuple[str, hashes.HashAlgorithm, int]:
    """JWS alg, hash and r/s octets of the signer's key type (hsm/algorithms.py): ES256 or ES512."""
    try:
        row = algorithm_of(cert.public_key())  # type: ignore[arg-type]
    except ValueError:
        row = None
    if row is None or row.hash is None:
        raise PKIError("the trust-list signer must have an EC key (P-256 or P-521)")
    return row.jws_alg, row.hash, row.field_octets


def _sign(ctx: Context, sg: Signer, data: bytes) -> tuple[bytes, str]:
    alg, h, size = _jws_alg(sg.cert)
    key = ctx.keystore.signer(sg.key_uri)
    sig_der = key.sign(data, ec.ECDSA(h))  # type: ignore[call-arg]
    header = {"alg": alg, "typ": "JOSE", "cty": "application/vnd.v2gpki.trustlist+json",
              "x5c": [_b64(c.public_bytes(serialization.Encoding.DER)) for c in sg.chain],
              "x5t#S256": _b64url(sg.cert.fingerprint(hashes.SHA256()))}
    protected = _b64url(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{protected}.{_b64url(data)}".encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(h)))  # type: ignore[call-arg]
    jws = f"{protected}..{_b64url(r.to_bytes(size, 'big') + s.to_bytes(size, 'big'))}"  # detached payload
    return sig_der, jws


# -- content ---------------------------------------------------------------------------------------------


def _entry(ca: CertificateAuthority, store: str) -> dict[str, Any]:
    cert = x509.load_der_x509_certificate(ca.der)
    return {
        "name": ca.name, "profile": ca.profile, "subject": ca.subject, "serial": ca.serial.upper(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(), "key_alg": ca.key_alg,
        "not_before": ca.not_before.isoformat(), "not_after": ca.not_after.isoformat(),
        "intended_use": INTENDED_USE[store] if ca.parent is None else ["chain building"],
        "issuer": ca.parent, "der": _b64(ca.der),
    }


def build_content(ctx: Context, store: str, now: datetime | None = None) -> dict[str, Any]:
    if store not in STORES:
        raise NotFound(f"no trust store {store!r} (one of {', '.join(STORES)})")
    now = now or utcnow()
    cross_profile = ctx.lifecycle.policy.truststore.cross_profile
    cas, revoked, crosses = dist.truststore_sources(ctx.db, store, cross_profile, now)
    anchors: list[dict[str, Any]] = []
    inter: list[dict[str, Any]] = []
    distrusted: list[dict[str, Any]] = []
    live: set[str] = set()
    for ca in cas:
        bad = ca.status == "revoked" or (ca.parent or ca.name, ca.serial) in revoked
        if bad or ca.status == "retired":
            # retired: withdrawn at the end of a root transition (pki/root_campaign.py): remove it too
            distrusted.append({"name": ca.name, "subject": ca.subject, "serial": ca.serial.upper(),
                               "sha256": hashlib.sha256(ca.der).hexdigest(),
                               "reason": "revoked" if bad else "withdrawn"})
            continue
        # staged: the new root of a transition, distributed before anything is issued under it
        if ca.status not in ("active", "staged") or ca.not_after <= now:
            continue
        live.add(ca.name)
        (anchors if ca.parent is None else inter).append(_entry(ca, store))
    by_subject = {a["subject"]: a["name"] for a in anchors}
    cross = []
    for c in crosses:
        cert = x509.load_der_x509_certificate(c.der)
        subj = cert.subject.rfc4514_string()
        if c.issuer in live and subj in by_subject:  # only once the new root itself is published
            cross.append({"issuer": c.issuer, "subject_root": by_subject[subj], "subject": subj,
                          "serial": c.serial.upper(), "sha256": hashlib.sha256(c.der).hexdigest(),
                          "not_before": c.not_before.isoformat(), "not_after": c.not_after.isoformat(),
                          "der": _b64(c.der)})
    return {"anchors": anchors, "intermediates": inter, "cross_certificates": cross, "distrusted": distrusted}


def content_digest(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def latest(ctx: Context, store: str) -> TrustStoreVersion | None:
    return dist.latest_version(ctx.db, store)


def publish(ctx: Context, store: str, reason: str, *, now: datetime | None = None,
            force: bool = False) -> TrustStoreVersion | None:
    """Publish the next version of ``store`` if its content changed (or nextUpdate is near). The version row
    and one delivery per 'truststore' subscriber commit together. None: nothing to publish, or a
    concurrent publisher won this version number."""
    lc = ctx.lifecycle
    pol = lc.policy.truststore
    now = now or utcnow()
    content = build_content(ctx, store, now)
    digest = content_digest(content)
    last = latest(ctx, store)
    if (last is not None and not force and last.content_sha256 == digest
            and last.next_update - now > timedelta(days=pol.republish_before_days)):
        return None
    version = (last.version if last else 0) + 1
    doc = {"format": FORMAT, "store": store, "version": version, "issued_at": now.isoformat(),
           "next_update": (now + timedelta(days=pol.validity_days)).isoformat(), "reason": reason[:200],
           "content_sha256": digest, **content}
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    sg = ensure_signer(ctx)
    sig_der, jws = _sign(ctx, sg, data)
    row = TrustStoreVersion(store=store, version=version, content_sha256=digest, reason=reason[:255],
                            bundle=data.decode(), signature=sig_der, jws=jws, signer_chain_pem=sg.chain_pem(),
                            issued_at=now, next_update=now + timedelta(days=pol.validity_days))

    def deliveries(s: Session) -> list[dict[str, Any]]:  # one per 'truststore' subscriber, in the same transaction
        subs = {r.id: r for rs in dist.subscribers(s, "truststore").values() for r in rs}
        return [dist.new_delivery(int(sid), r.org, "truststore", f"truststore:{store}:{version}",
                                  {"event": "truststore", "store": store, "version": version,
                                   "truststore_ref": [store, version]}, now)
                for sid, r in subs.items() if sid is not None]

    entry = audit.Entry(actor="worker", action="truststore.publish", object=f"{store}/{version}",
                        details={"reason": reason[:200], "sha256": digest,
                                 "anchors": [a["name"] for a in content["anchors"]]})
    if not dist.add_version(ctx.db, row, deliveries, entry):
        return None  # a concurrent publisher won this version number
    log.info("published trust store %s version %d (%s)", store, version, reason)
    try:
        materialize(ctx, row)
    except OSError:  # the database has it; publish_all() re-materializes a missing directory
        log.warning("writing trust store %s v%d files failed", store, version, exc_info=True)
    return row


def publish_all(ctx: Context, reason: str, stores: Sequence[str] = STORES) -> list[TrustStoreVersion]:
    out = []
    for st in stores:
        row = publish(ctx, st, reason)
        if row is not None:
            out.append(row)
        else:
            last = latest(ctx, st)
            if last is not None and not (version_dir(ctx, st, last.version) / "trustlist.json").exists():
                materialize(ctx, last)
    return out


def get_version(ctx: Context, store: str, version: int) -> TrustStoreVersion:
    row = dist.version_of(ctx.db, store, version)
    if row is None:
        raise NotFound(f"no version {version} of trust store {store!r}")
    return row


def version_document(ctx: Context, store: str, version: int) -> dict[str, Any]:
    """What the API serves and the webhook pushes: the exact signed bytes (base64) and both signatures."""
    row = get_version(ctx, store, version)
    return {"store": row.store, "version": row.version, "issued_at": row.issued_at.isoformat(),
            "next_update": row.next_update.isoformat(), "content_sha256": row.content_sha256,
            "reason": row.reason, "bundle_b64": _b64(row.bundle.encode()),
            "signature_b64": _b64(row.signature), "jws": row.jws, "signer_chain_pem": row.signer_chain_pem}


# -- offline verification --------------------------------------------------------------------------------


def verify_bundle(data: bytes, signature_der: bytes, signer_chain_pem: str, anchors_pem: str, *,
                  jws: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Verify a trust list offline against pinned anchor certificate(s); return the parsed document.

    Checks: the signer chain up to one of the pinned anchors (signatures, validity), the DER signature over
    the exact bytes, the detached JWS if given, and that the document is not past its nextUpdate."""
    now = now or utcnow()
    chain = x509.load_pem_x509_certificates(signer_chain_pem.encode())
    pinned = x509.load_pem_x509_certificates(anchors_pem.encode())
    pinned_fp = {c.fingerprint(hashes.SHA256()) for c in pinned}
    if not chain:
        raise TrustListError("empty signer chain")
    for child, parent in zip(chain, chain[1:], strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise TrustListError(f"signer chain broken at {child.subject.rfc4514_string()}: {exc}") from None
    top = chain[-1]
    if top.fingerprint(hashes.SHA256()) not in pinned_fp:
        anchor = next((p for p in pinned if p.subject == top.issuer), None)
        if anchor is None:
            raise TrustListError("the signer chain does not end at a pinned anchor")
        try:
            top.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            raise TrustListError("the signer chain does not verify against the pinned anchor") from None
    for c in chain:
        if not c.not_valid_before_utc <= now < c.not_valid_after_utc:
            raise TrustListError(f"certificate {c.subject.rfc4514_string()} is outside its validity")
    signer = chain[0]
    pub = signer.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise TrustListError("signer key is not EC")
    alg, h, size = _jws_alg(signer)
    try:
        pub.verify(signature_der, data, ec.ECDSA(h))
    except InvalidSignature:
        raise TrustListError("signature does not verify over the trust list bytes") from None
    if jws is not None:
        protected, payload, sig = jws.split(".")
        if payload:
            raise TrustListError("the JWS must have a detached payload")
        header = json.loads(_unb64url(protected))
        if header.get("alg") != alg:
            raise TrustListError("JWS alg mismatch")
        raw = _unb64url(sig)
        der = encode_dss_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))
        try:
            pub.verify(der, f"{protected}.{_b64url(data)}".encode(), ec.ECDSA(h))
        except InvalidSignature:
            raise TrustListError("JWS signature does not verify") from None
    doc: dict[str, Any] = json.loads(data)
    if doc.get("format") != FORMAT:
        raise TrustListError(f"unknown format {doc.get('format')!r}")
    if datetime.fromisoformat(doc["next_update"]) <= now:
        raise TrustListError("trust list is past its nextUpdate: fetch a newer version")
    for entry in doc.get("anchors", []) + doc.get("intermediates", []):
        if hashlib.sha256(base64.b64decode(entry["der"])).hexdigest() != entry["sha256"]:
            raise TrustListError(f"certificate digest mismatch for {entry['name']}")
    return doc


def verify_document(document: dict[str, Any], anchors_pem: str, *, now: datetime | None = None) -> dict[str, Any]:
    """Verify what the API / webhook delivers (see version_document)."""
    return verify_bundle(base64.b64decode(document["bundle_b64"]), base64.b64decode(document["signature_b64"]),
                         document["signer_chain_pem"], anchors_pem, jws=document.get("jws"), now=now)


# -- file layouts ----------------------------------------------------------------------------------------

# EVerest (libevse-security / libocpp): bundle files under certs/ca/<domain>/ (all anchors concatenated).
EVEREST = {"v2g": "ca/v2g/V2G_ROOT_CA", "mo": "ca/mo/MO_ROOT_CA", "csms": "ca/csms/CSMS_ROOT_CA",
           "oem": "ca/oem/OEM_ROOT_CA"}
# Josev (iso15118): one DER root per file under <PKI_PATH>/iso15118_2/certs and iso15118_20/certs.
JOSEV = {"v2g": "v2gRootCACert", "mo": "moRootCACert", "oem": "oemRootCACert"}


def truststores_dir(ctx: Context) -> Path:
    return ctx.settings.home_dir / "truststores"


def version_dir(ctx: Context, store: str, version: int) -> Path:
    return truststores_dir(ctx) / store / str(version)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _layout_files(store: str, doc: dict[str, Any]) -> dict[str, bytes]:
    anchors = [x509.load_der_x509_certificate(base64.b64decode(a["der"])) for a in doc["anchors"]]
    profiles = [a["profile"] for a in doc["anchors"]]
    files: dict[str, bytes] = {}
    if anchors:
        files[f"everest/{EVEREST[store]}.pem"] = "".join(_pem(c) for c in anchors).encode()
    # Single-certificate formats: the oldest valid anchor of each generation (existing chains anchor to it;
    # after a rollover the new root is in the PEM bundles and takes over here when the old one expires).
    for std, sub in (("iso15118-2", "iso15118_2"), ("iso15118-20", "iso15118_20")):
        pick = [(c, p) for c, p in zip(anchors, profiles, strict=True)
                if (p.endswith("-20") if std == "iso15118-20" else not p.endswith("-20"))]
        if not pick:
            continue
        pick.sort(key=lambda cp: (not isinstance(cp[0].public_key(), ec.EllipticCurvePublicKey),
                                  cp[0].not_valid_before_utc))
        first = pick[0][0]
        if std == "iso15118-2" and store in ("v2g", "mo"):
            files[f"everest/{EVEREST[store]}.der"] = first.public_bytes(serialization.Encoding.DER)
        if store in JOSEV:
            files[f"josev/{sub}/certs/{JOSEV[store]}.der"] = first.public_bytes(serialization.Encoding.DER)
            files[f"josev/{sub}/certs/{JOSEV[store]}.pem"] = _pem(first).encode()
    return files


def materialize(ctx: Context, row: TrustStoreVersion) -> Path:
    """Write $V2GPKI_HOME/truststores/<store>/<version>/ and refresh truststores/current (all stores)."""
    d = version_dir(ctx, row.store, row.version)
    doc = json.loads(row.bundle)
    _write(d / "trustlist.json", row.bundle.encode())
    _write(d / "trustlist.json.sig", row.signature)
    _write(d / "trustlist.jws", row.jws.encode())
    _write(d / "signer-chain.pem", row.signer_chain_pem.encode())
    for rel, data in _layout_files(row.store, doc).items():
        _write(d / rel, data)
    _refresh_current(ctx)
    return d


def _refresh_current(ctx: Context) -> None:
    root = truststores_dir(ctx)
    stage = Path(tempfile.mkdtemp(dir=root, prefix=".current-"))
    versions = {}
    for st in STORES:
        last = latest(ctx, st)
        if last is None:
            continue
        versions[st] = last.version
        src = version_dir(ctx, st, last.version)
        for sub in ("everest", "josev"):
            if (src / sub).is_dir():
                shutil.copytree(src / sub, stage / sub, dirs_exist_ok=True)
        if (src / "trustlist.json").exists():
            shutil.copy2(src / "trustlist.json", stage / f"{st}.trustlist.json")
    (stage / "VERSIONS.json").write_text(json.dumps(versions, sort_keys=True) + "\n")
    link = root / "current"
    tmp_link = root / f".current-link-{os.getpid()}"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(stage.name)
    old = os.readlink(link) if link.is_symlink() else None
    os.replace(tmp_link, link)  # atomic: readers see the old tree or the new one, never a mix
    if old and old != stage.name:
        shutil.rmtree(root / old, ignore_errors=True)


# -- CLI: offline verification (`python -m pki.trustlist verify DIR --anchor CSMS_ROOT_CA.pem`) ---------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pki.trustlist", description="verify a trust list offline")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify")
    v.add_argument("dir", help="a version directory (trustlist.json, .sig, .jws, signer-chain.pem)")
    v.add_argument("--anchor", required=True, help="PEM of the pinned root that issued the signer (csms-root)")
    a = p.parse_args(argv)
    d = Path(a.dir)
    try:
        doc = verify_bundle((d / "trustlist.json").read_bytes(), (d / "trustlist.json.sig").read_bytes(),
                            (d / "signer-chain.pem").read_text(), Path(a.anchor).read_text(),
                            jws=(d / "trustlist.jws").read_text())
    except (TrustListError, OSError, ValueError) as exc:
        print(f"trust list INVALID: {exc}", file=sys.stderr)
        return 1
    print(f"trust list OK: store {doc['store']} version {doc['version']}, {len(doc['anchors'])} anchor(s), "
          f"next update {doc['next_update']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["FORMAT", "STORES", "build_content", "ensure_signer", "get_version", "latest", "materialize",
           "publish", "publish_all", "verify_bundle", "verify_document", "version_document"]
