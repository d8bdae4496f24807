"""`v2gpki init`: build the configured hierarchies in the HSM and the database, idempotently.

Re-running finishes a half-done run: a CA whose row exists is skipped; a key generated for a CA whose
certificate never landed is reused (it has signed nothing that was stored), so a second root is never
created. Pending intents left by a killed run are marked 'abandoned'.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from hsm.algorithms import ALGORITHMS
from hsm.errors import KeyExistsError, KeyNotFoundError
from hsm.keystore import KeyAlg, KeyStore
from pki.csr import SubjectFields
from pki.issuance import Engine, Issued, IssueRequest, key_alg_of_public
from pki.profiles import CAEntry, Hierarchy, ProfileSet
from pki.store import certificates as store
from pki.store.db import Session, utcnow
from pki.store.models import CertificateAuthority

Progress = Callable[[int, int, str, str], None]


def ca_key_label(name: str) -> str:
    return f"ca-{name}"


def ocsp_key_label(name: str) -> str:
    return f"ocsp-{name}"


def svc_key_label(name: str) -> str:
    return f"svc-{name}"


def _ensure_key(ks: KeyStore, label: str, alg: KeyAlg):  # type: ignore[no-untyped-def]
    try:
        return ks.public_key(label)
    except KeyNotFoundError:
        pass
    try:
        return ks.create_key(label, alg)
    except KeyExistsError:
        # Half a pair under our label (public without private or the reverse): a run killed inside
        # C_GenerateKeyPair. Nothing was ever signed with it — the CA or service certificate is made only
        # after the whole pair exists — so it is replaced rather than left as an orphan.
        ks.destroy(label)
        return ks.create_key(label, alg)


def _hierarchy_of(profile: str) -> str:
    for prefix, h in (("v2g", "v2g"), ("cpo", "v2g"), ("cps", "v2g"), ("oem", "oem"), ("mo", "mo"),
                      ("csms", "csms")):
        if profile.startswith(prefix):
            return h
    return "other"


def _name_hashes(cert_der: bytes) -> tuple[str, str]:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(cert_der)
    name_hash = hashlib.sha1(cert.subject.public_bytes()).hexdigest()  # noqa: S324 - RFC 6960 CertID
    from pki.der import spki_key_bits  # issuerKeyHash input (RFC 6960 §4.1.1)

    return name_hash, hashlib.sha1(spki_key_bits(cert)).hexdigest()  # noqa: S324


def create_ca(engine: Engine, entry: CAEntry, h: Hierarchy) -> Issued:
    profile = engine.profiles.get(entry.profile)
    alg = entry.key_alg or profile.key_algs[0]
    label = ca_key_label(entry.name)
    pub = _ensure_key(engine.keystore, label, alg)
    if key_alg_of_public(pub) is not alg:
        raise KeyNotFoundError(f"key {label!r} exists with another algorithm; remove it or rename the CA")
    subject = SubjectFields(cn=entry.cn, o=h.organization, c=h.country, dc=profile.subject.dc)

    def add_ca_row(s: Session, issued: list[Issued]) -> None:
        i = issued[0]
        nh, kh = _name_hashes(i.der)
        s.add(CertificateAuthority(
            name=entry.name, profile=entry.profile, parent=entry.parent,
            key_uri=engine.keystore.uri(label), key_alg=alg.value, hierarchy=_hierarchy_of(entry.profile),
            serial=i.serial, subject=i.cert.subject.rfc4514_string(), name_hash_sha1=nh, key_hash_sha1=kh,
            not_before=i.cert.not_valid_before_utc, not_after=i.cert.not_valid_after_utc, der=i.der,
            created_at=utcnow(),
        ))

    req = IssueRequest(
        profile=entry.profile, public_key=pub, subject=subject, identifier=entry.name,
        ca=entry.name if profile.self_signed else entry.parent, actor="init",
        key_uri=engine.keystore.uri(label),
    )
    out = engine.issue_many([req], extra=add_ca_row)
    engine.reload_cas()
    return out[0]


def service_cert_exists(engine: Engine, issuer: str, profile: str, key_uri: str) -> bool:
    return store.has_valid_certificate(engine.db, issuer=issuer, profile=profile, key_uri=key_uri, now=utcnow())


def issue_service_cert(engine: Engine, *, issuer: str, profile_name: str, label: str, cn: str,
                       h: Hierarchy, identifier: str) -> Issued:
    ca = engine.ca(issuer)
    profile = engine.profiles.get(profile_name)
    alg = ca.alg if ca.alg in profile.key_algs else profile.key_algs[0]
    pub = _ensure_key(engine.keystore, label, alg)
    subject = SubjectFields(cn=cn[:64], o=h.organization, c=h.country, dc=profile.subject.dc)
    return engine.issue(IssueRequest(
        profile=profile_name, public_key=pub, subject=subject, identifier=identifier, ca=issuer,
        actor="init", key_uri=engine.keystore.uri(label),
    ))


def ocsp_profile_for(engine: Engine, h: Hierarchy, ca_name: str) -> str:
    ca = engine.ca(ca_name)
    p20 = engine.profiles.get(h.ocsp_signer_profile_20)
    return h.ocsp_signer_profile_20 if ca.row.profile in p20.issuers else h.ocsp_signer_profile


def ensure_ocsp_signer(engine: Engine, h: Hierarchy, ca_name: str) -> Issued | None:
    label = ocsp_key_label(ca_name)
    prof = ocsp_profile_for(engine, h, ca_name)
    if service_cert_exists(engine, ca_name, prof, engine.keystore.uri(label)):
        return None
    return issue_service_cert(engine, issuer=ca_name, profile_name=prof, label=label,
                              cn=f"OCSP {engine.ca(ca_name).cert.subject.get_attributes_for_oid(_CN)[0].value!s}",
                              h=h, identifier=f"ocsp-{ca_name}")


# -- what the token must offer (#22 item 4) -------------------------------------------------------------

# PKCS#11 mechanisms a key of each algorithm needs in the token: generated there, then signing there.
# (P-256 and P-521 digests are hashed in software and signed with plain CKM_ECDSA: hsm/pkcs11.py.)
# (The algorithm table, hsm/algorithms.py, holds them.)
KEY_MECHANISMS: dict[KeyAlg, tuple[str, ...]] = {
    a: (row.keygen_mechanism, row.sign_mechanism) for a, row in ALGORITHMS.items()}
# The webhook-secret sealing key (hsm/sealing.py): not part of a hierarchy, reported as a warning.
SEALING_MECHANISMS: tuple[str, ...] = ("CKM_AES_KEY_GEN", "CKM_AES_GCM")


@dataclass
class TokenPlan:
    """What a hierarchy asks of a token that `init` can check before creating anything: ``skipped`` maps
    every CA or service key the token cannot hold to why (the mechanisms its keys lack, or an issuer that
    is itself skipped); ``missing`` is the union of the mechanisms lacking; ``reduced`` the hierarchy
    without what is skipped (what `v2gpki init --skip-unsupported` builds)."""

    skipped: dict[str, str]
    missing: tuple[str, ...]
    reduced: Hierarchy
    warnings: list[str] = field(default_factory=list)


def _needs(alg: KeyAlg, mechanisms: frozenset[str]) -> list[str]:
    return [m for m in KEY_MECHANISMS[alg] if m not in mechanisms]


def token_plan(h: Hierarchy, profiles: ProfileSet, mechanisms: frozenset[str]) -> TokenPlan:
    """Check ``h`` against the mechanisms a token offers (Pkcs11KeyStore.mechanisms()). A CA is skipped
    when its key or its delegated OCSP signer's key needs a mechanism the token lacks, or when its parent
    is skipped; a service key when its issuer is skipped or its key cannot be made."""
    skipped: dict[str, str] = {}
    missing: set[str] = set()
    algs: dict[str, KeyAlg] = {}
    for ca in h.cas:
        if ca.parent is not None and ca.parent in skipped:
            skipped[ca.name] = f"its parent {ca.parent} is skipped"
            continue
        profile = profiles.get(ca.profile)
        alg = ca.key_alg or profile.key_algs[0]
        lack = _needs(alg, mechanisms)
        if not lack and ca.ocsp_signer:
            p20 = profiles.get(h.ocsp_signer_profile_20)
            sp = p20 if ca.profile in p20.issuers else profiles.get(h.ocsp_signer_profile)
            lack = _needs(alg if alg in sp.key_algs else sp.key_algs[0], mechanisms)
        if lack:
            skipped[ca.name] = f"{alg.value} keys need {', '.join(lack)}"
            missing.update(lack)
            continue
        algs[ca.name] = alg
    keys = []
    for sk in h.service_keys:
        if sk.issuer in skipped:
            skipped[sk.name] = f"its issuer {sk.issuer} is skipped"
            continue
        profile = profiles.get(sk.profile)
        ca_alg = algs.get(sk.issuer)
        alg = ca_alg if ca_alg in profile.key_algs else profile.key_algs[0]
        lack = _needs(alg, mechanisms)
        if lack:
            skipped[sk.name] = f"{alg.value} keys need {', '.join(lack)}"
            missing.update(lack)
            continue
        keys.append(sk)
    reduced = h.model_copy(update={"cas": [c for c in h.cas if c.name not in skipped], "service_keys": keys})
    warnings = []
    lack_sealing = [m for m in SEALING_MECHANISMS if m not in mechanisms]
    if lack_sealing:
        warnings.append(f"the token lacks {', '.join(lack_sealing)}: webhook subscriptions with a secret cannot "
                        "be sealed (hsm/sealing.py): adding one fails as an HSM configuration error")
    return TokenPlan(skipped, tuple(sorted(missing)), reduced, warnings)


from cryptography.x509.oid import NameOID  # noqa: E402

_CN = NameOID.COMMON_NAME


def init_hierarchy(engine: Engine, h: Hierarchy, progress: Progress | None = None) -> dict[str, int]:
    # A run killed inside a key generation can leave a torn, unlabeled public-key object in the token;
    # resuming removes it so the token holds exactly the hierarchy's keys (no orphan key).
    discard = getattr(engine.keystore, "discard_torn_keys", None)
    if discard is not None:
        discard()
    # Every intent still pending when init starts was left by an interrupted run (this run has made
    # none yet). No time filter: created_at has whole seconds, and a run killed and resumed within the
    # same second (a fast machine) left its intent pending behind a `created_at < now` filter. An intent
    # of an API issuance in flight at this moment is overwritten by that issuance's own completion
    # (issued or failed), which does not look at the previous state.
    abandoned = store.abandon_pending_intents(engine.db)
    existing = {r.name for r in store.all_cas(engine.db)}
    steps: list[tuple[str, str]] = []
    for ca in h.cas:
        steps.append(("ca", ca.name))
        if ca.ocsp_signer:
            steps.append(("ocsp", ca.name))
    for sk in h.service_keys:
        steps.append(("svc", sk.name))
    stats = {"created": 0, "skipped": 0, "abandoned_intents": abandoned}
    by_name = {c.name: c for c in h.cas}
    for n, (kind, name) in enumerate(steps, 1):
        if kind == "ca":
            if name in existing:
                status = "exists"
            else:
                create_ca(engine, by_name[name], h)
                status = "created"
        elif kind == "ocsp":
            status = "created" if ensure_ocsp_signer(engine, h, name) else "exists"
            name = f"OCSP signer of {name}"
        else:
            sk = next(x for x in h.service_keys if x.name == name)
            label = svc_key_label(sk.name)
            if service_cert_exists(engine, sk.issuer, sk.profile, engine.keystore.uri(label)):
                status = "exists"
            else:
                issue_service_cert(engine, issuer=sk.issuer, profile_name=sk.profile, label=label, cn=sk.cn,
                                   h=h, identifier=sk.name)
                status = "created"
        stats["created" if status == "created" else "skipped"] += 1
        if progress:
            progress(n, len(steps), name, status)
    return stats


__all__ = ["init_hierarchy", "ca_key_label", "ocsp_key_label", "svc_key_label", "token_plan", "TokenPlan"]
