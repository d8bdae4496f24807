"""ISO 15118 / eMI3 identifier syntax (CN values) and tenant prefix ownership.

Patterns per the shared profiles document §3. Letters are case-insensitive (RFC 5234 ALPHA), so we
normalise to upper case instead of rejecting lower case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from pki.errors import BadSubject


@dataclass(frozen=True)
class SubjectFields:
    """The subject attributes the V2G profiles use (CN, O, C, DC), normalised by the RA (pki/csr.py).

    Defined here, below both pki.csr (which fills it) and pki.tbs (which encodes it), so neither
    imports the other for it."""

    cn: str
    o: str | None
    c: str | None
    dc: str | None

# ISO 15118-2 Annex H / DIN SPEC 91286: country(2) [*] operator(3) [*] 'E' power outlet id.
EVSEID_RE = re.compile(r"^[A-Z]{2}\*?[A-Z0-9]{3}\*?E[A-Z0-9*]{1,31}$")
# ISO 15118-20: CC-OPR-S-<controller id>-<check>; separators and check digit optional between IT systems.
SECCID_RE = re.compile(r"^[A-Z]{2}-?[A-Z0-9]{3}-?S[A-Z0-9*-]{1,60}$")
# EMAID: country(2) provider(3) instance(9) [check(1)], hyphens all present or all absent.
EMAID_RE = re.compile(r"^([A-Z]{2})(-?)([A-Z0-9]{3})\2([A-Z0-9]{9})(?:\2([A-Z0-9]))?$")
# PCID: WMI(3) + OEM id(14) + optional check digit.
PCID_RE = re.compile(r"^[A-Z0-9]{17,18}$")
STATION_RE = re.compile(r"^[A-Za-z0-9._:*+@/-]{1,64}$")  # OCPP CiString identifiers, 64 chars max
FQDN_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9-]{1,63}$")


def normalise_evseid(value: str) -> str:
    v = value.strip().upper()
    if not EVSEID_RE.match(v) or not 7 <= len(v) <= 37:
        raise BadSubject(f"CN {value!r} is not a valid EVSEID (e.g. DE*ICE*E45B*78C)")
    return v


def normalise_seccid(value: str) -> str:
    v = value.strip().upper()
    if not SECCID_RE.match(v) or len(v) > 64:
        raise BadSubject(f"CN {value!r} is not a valid SECCID (e.g. DE-ICE-S-00003C4D5578-2)")
    return v


def normalise_emaid(value: str) -> str:
    """Return the EMAID without hyphens (the V2G eMAID element holds 14–15 characters)."""
    v = value.strip().upper()
    m = EMAID_RE.match(v)
    if not m:
        raise BadSubject(f"CN {value!r} is not a valid EMAID (e.g. DE8AA1A2B3C4D5 or DE-8AA-1A2B3C4D5-X)")
    return "".join(g for i, g in enumerate(m.groups()) if i != 1 and g)


def normalise_pcid(value: str) -> str:
    v = value.strip().upper()
    if not PCID_RE.match(v):
        raise BadSubject(f"CN {value!r} is not a valid PCID (17–18 alphanumerics, e.g. WP012345678901234)")
    return v


def check_station_id(value: str) -> str:
    if not STATION_RE.match(value):
        raise BadSubject(f"CN {value!r} is not a valid charging station identity (≤ 64 characters)")
    return value


def check_fqdn(value: str) -> str:
    v = value.strip().lower()
    if not FQDN_RE.match(v):
        raise BadSubject(f"CN {value!r} is not a valid DNS name")
    return v


def operator_of_evseid(evseid: str) -> str:
    """Country + operator id, in the canonical 'DE*ABC' form."""
    v = evseid.replace("*", "").replace("-", "").upper()
    return f"{v[:2]}*{v[2:5]}"


def provider_of_emaid(emaid: str) -> str:
    v = emaid.replace("-", "").upper()
    return f"{v[:2]}-{v[2:5]}"


def owns_identifier(prefixes: list[str], kind: str, identifier: str) -> bool:
    """Does a tenant with these prefixes own this identifier?

    CPO prefixes are operator IDs ('DE*ABC', separators optional), eMSP prefixes provider IDs
    ('DE-8AA'), OEM prefixes WMIs ('WP0'). Comparison ignores '*' and '-' separators and case.
    """

    def flat(s: str) -> str:
        return s.replace("*", "").replace("-", "").upper()

    ident = flat(identifier)
    for p in prefixes:
        fp = flat(p)
        if not fp:
            continue
        if kind in ("evseid", "seccid", "emaid"):
            if ident[:5] == fp[:5] and len(fp) >= 5:
                return True
        elif ident.startswith(fp):
            return True
    return False


def subject_fields_of(cert: x509.Certificate) -> SubjectFields:
    """The CN, O, C and DC of a certificate's subject (what the V2G profiles use)."""

    def one(oid: x509.ObjectIdentifier) -> str | None:
        v = cert.subject.get_attributes_for_oid(oid)
        return str(v[0].value) if v else None

    return SubjectFields(cn=one(NameOID.COMMON_NAME) or "", o=one(NameOID.ORGANIZATION_NAME),
                         c=one(NameOID.COUNTRY_NAME), dc=one(NameOID.DOMAIN_COMPONENT))
