"""#23 item 3, one API path, checked on the source tree:

- no environment read outside pki/config.py's Settings, except the commented exceptions below (another
  program's own variable, a child process's environment, a write for the PKCS#11 library);
- PKIError and its subclasses carry no HTTP knowledge (no ``status`` attribute, no ``self.status =``);
- problem+json bodies are built only in api/problems.py (an AST check, with a self-test on planted code);
- every typed error class is mapped to an HTTP status in api/problems.STATUS, with the statuses clients saw
  before the mapping moved out of pki/ (so a new error class cannot silently become a 500, nor an old one
  change its answer);
- the OCPP SignCertificate path parses the CSR once.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from fastapi.testclient import TestClient

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "pki", "hsm", "workers")


def _sources() -> Iterator[tuple[str, str]]:
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if "/migrations/" in rel:
                continue
            yield rel, path.read_text()


# -- settings ---------------------------------------------------------------------------------------------

# Environment uses outside pki/config.py that are not settings of ours, each marked in the code by a
# comment starting "env:" on its line or the line above. The count per file keeps the list from growing
# unnoticed.
ENV_EXCEPTIONS = {
    "api/observability.py": (1, "PROMETHEUS_MULTIPROC_DIR: prometheus_client's own variable"),
    "pki/backup.py": (2, "SOFTHSM2_CONF (SoftHSM2's own variable)"),
    "pki/store/backup.py": (1, "pg_dump's and pg_restore's child environment"),
    "hsm/p11kit.py": (1, "the p11-kit server child's environment"),
    "hsm/pkcs11.py": (1, "SOFTHSM2_CONF: SoftHSM2's own variable, where its lock lives"),
    "hsm/token.py": (3, "softhsm2-util's child environment; SOFTHSM2_CONF written for the library"),
}


def environ_uses(text: str) -> list[int]:
    """Lines that read or write the process environment: os.environ, os.getenv, os.putenv, environ/getenv
    imported from os."""
    tree = ast.parse(text)
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "os"
                for a in n.names if a.name in ("environ", "getenv", "putenv")}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                and node.attr in ("environ", "getenv", "putenv", "environb"):
            lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id in imported:
            lines.append(node.lineno)
    return sorted(lines)


def _commented(text: str, line: int) -> bool:
    lines = text.splitlines()
    here = lines[line - 1]
    above = lines[line - 2] if line >= 2 else ""
    return "# env:" in here or above.strip().startswith("# env:")


def test_environment_is_read_only_through_settings() -> None:
    found: dict[str, list[int]] = {}
    for rel, text in _sources():
        if rel == "pki/config.py":
            continue
        uses = environ_uses(text)
        if uses:
            found[rel] = uses
    unexpected = {rel: lines for rel, lines in found.items() if rel not in ENV_EXCEPTIONS}
    assert not unexpected, f"environment read outside pki/config.py (add a Settings field instead): {unexpected}"
    for rel, (count, why) in ENV_EXCEPTIONS.items():
        lines = found.get(rel, [])
        # one statement may name os.environ twice (a fallback name): count distinct lines
        assert len(set(lines)) == count, f"{rel}: {sorted(set(lines))} environment uses, listed {count} ({why})"
        text = (REPO / rel).read_text()
        bare = [n for n in set(lines) if not _commented(text, n)]
        assert not bare, f"{rel}: environment use without an '# env:' comment saying why, lines {bare}"


def test_the_environ_checker_finds_reads() -> None:
    assert environ_uses("import os\nx = os.environ.get('A')\n") == [2]
    assert environ_uses("import os\nx = os.getenv('A')\n") == [2]
    assert environ_uses("from os import environ\n\nx = environ['A']\n") == [3]
    assert environ_uses("from os import getenv as g\ng('A')\n") == [2]
    assert environ_uses("import os\nos.path.join('a')\n") == []
    assert _commented("# env: why\nx = os.environ\n", 2) and not _commented("x = 1\nx = os.environ\n", 2)


def test_no_second_settings_class() -> None:
    """One Settings object: no other pydantic-settings class reads the environment."""
    bad = [rel for rel, text in _sources() if rel != "pki/config.py" and "BaseSettings" in text]
    assert not bad, bad


# -- errors without HTTP ------------------------------------------------------------------------------------


def _import_all() -> None:
    for pkg in ("pki", "hsm"):
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            if ".migrations" not in info.name:
                importlib.import_module(info.name)


def _subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


def _pki_errors() -> set[type]:
    from hsm.errors import HSMError
    from pki.errors import PKIError

    _import_all()
    ours = {c for c in _subclasses(PKIError) | _subclasses(HSMError) | {PKIError, HSMError}
            if c.__module__.split(".")[0] in ("pki", "hsm")}
    return ours


HTTP_ATTRIBUTES = ("status", "status_code", "http_status")


def test_errors_carry_no_http_status() -> None:
    for cls in _pki_errors():
        assert not any(a in vars(cls) for a in HTTP_ATTRIBUTES), f"{cls.__module__}.{cls.__name__} names an HTTP status"
    # nor set on instances
    for rel, text in _sources():
        if not rel.startswith(("pki/", "hsm/")):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    assert not (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                                and t.value.id == "self" and t.attr in HTTP_ATTRIBUTES
                                and _in_exception_class(text, node.lineno)), f"{rel}:{node.lineno}"


def _in_exception_class(text: str, line: int) -> bool:
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef) and node.lineno <= line <= (node.end_lineno or node.lineno):
            if any(isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception", "Failure")) for b in node.bases):
                return True
    return False


# The HTTP status each error class answered before its mapping moved from pki/ to api/problems.py (#23):
# clients see the same answers. A new class gets a row here and in problems.STATUS.
EXPECTED_STATUS = {
    "PKIError": 400, "ConfigError": 500, "PolicyError": 500, "ClockSkew": 503, "UnknownProfile": 400,
    "UnknownCA": 404, "BadCSR": 400, "BadSignature": 400, "BadKey": 400, "BadSubject": 400,
    "CertificateTooLarge": 400, "LintError": 422, "NotFound": 404, "UnknownStation": 404, "AlreadyRevoked": 409,
    "BadRevocation": 400, "Forbidden": 403, "Conflict": 409, "CoverageTooLow": 409, "RootInUse": 409,
    "CampaignState": 409, "MalformedOCSPRequest": 400, "BadStatusRequest": 400, "CRLUnavailable": 503,
    "BackupError": 400, "BadOrganization": 400, "Unauthenticated": 401, "BadCertificate": 400,
    "UnknownRoot": 400, "BadRootImport": 400, "TrustListError": 400, "FirmwareRefused": 409,
    "RollbackRefused": 409, "FirmwareVerificationFailed": 422, "OAuthError": 400, "UnsupportedNamespace": 400,
    "BadContractData": 400, "InvalidValue": 400, "Duplicate": 409, "StorageError": 503,
    "CPSError": 400, "ExiError": 400, "ExiDecodeError": 400, "ExiUnsupported": 400, "ExiLimitExceeded": 413,
    "ExiEncodeError": 400, "KeyWrapError": 400, "XmlDsigError": 400, "SignatureVerificationFailed": 400,
    "ActionMismatch": 400, "ResponseTooLarge": 422, "CPSFailure": 400, "CPS20Failure": 400,
    "HSMError": 503, "HSMConfigError": 503, "HSMUnavailable": 503, "KeyNotFoundError": 503,
    "KeyExistsError": 503, "SignatureCheckFailed": 503, "SealError": 503, "KeyUriError": 503,
}


def test_every_error_class_is_mapped() -> None:
    from api.problems import STATUS, status_of
    from hsm.errors import HSMError

    mapped = {cls for cls, _ in STATUS}
    for cls in _pki_errors():
        name = f"{cls.__module__}.{cls.__name__}"
        if not issubclass(cls, HSMError):  # HSM errors: one answer for the family (problems._hsm*)
            assert cls in mapped, f"{name} has no row in api/problems.STATUS"
        assert cls.__name__ in EXPECTED_STATUS, f"{name}: add its HTTP status to EXPECTED_STATUS and STATUS"
        exc = cls.__new__(cls)  # no constructor arguments needed to classify it
        assert status_of(exc) == EXPECTED_STATUS[cls.__name__], name


def test_status_table_is_most_specific_first() -> None:
    """A class listed after one of its ancestors would never be reached."""
    from api.problems import STATUS

    for i, (cls, _) in enumerate(STATUS):
        for earlier, _ in STATUS[:i]:
            assert not issubclass(cls, earlier), f"{cls.__name__} comes after its ancestor {earlier.__name__}"


# -- problem bodies ----------------------------------------------------------------------------------------

# Only api/problems.py builds problem documents. The hand-written OCSP server (api/ocsp_fast.py, the `ocsp`
# engineer's) calls api/problems.problem_document too, so no exception is needed.
PROBLEM_HOME = "api/problems.py"


def problem_constructions(text: str) -> list[int]:
    """Lines that build a problem document by hand: the media type or the problem type URI as a literal, or a
    dict literal with the problem members type + title + status."""
    out = []
    tree = ast.parse(text)
    # a string standing alone as a statement (a docstring) only talks about problem bodies
    prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes) and id(node) not in prose:
            v = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
            if "problem+json" in v or "v2gpki.dev/problems" in v:
                out.append(node.lineno)
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if {"type", "title", "status"} <= keys:
                out.append(node.lineno)
    return sorted(set(out))


def test_problem_bodies_only_in_api_problems() -> None:
    bad = {rel: lines for rel, text in _sources()
           if rel.startswith("api/") and rel != PROBLEM_HOME and (lines := problem_constructions(text))}
    assert not bad, f"problem+json built outside {PROBLEM_HOME} (use api.problems): {bad}"


def test_the_problem_checker_finds_planted_bodies() -> None:
    planted = ('from fastapi.responses import JSONResponse\n'
               'def f():\n'
               '    return JSONResponse({"type": "x", "title": "y", "status": 400}, media_type="a")\n'
               'H = b"Content-Type: application/problem+json"\n'
               'T = "https://v2gpki.dev/problems/" + "bad"\n')
    assert problem_constructions(planted) == [3, 4, 5]
    assert problem_constructions('d = {"status": "Rejected", "statusInfo": {}}\n') == []
    assert problem_constructions('def f():\n    """Answers application/problem+json."""\n') == []


# OPCP's and OPNC's own error shape ({"errorMessages": [...], "traceId": uuid}) is built in one module too
# (#23 item 3), its statuses still from api/problems.py.
OPCP_ERROR_HOME = "api/opcp/pool_shapes.py"


def opcp_error_constructions(text: str) -> list[int]:
    """Lines that build the OPCP/OPNC error body by hand: its member names as literals (docstrings aside)."""
    tree = ast.parse(text)
    prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return sorted({n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in prose
                   and n.value in ("errorMessages", "traceId")})


def test_opcp_error_bodies_only_in_pool_shapes() -> None:
    bad = {rel: lines for rel, text in _sources()
           if rel.startswith("api/") and rel != OPCP_ERROR_HOME and (lines := opcp_error_constructions(text))}
    assert not bad, f"OPCP error body built outside {OPCP_ERROR_HOME} (use its error or opcp_error): {bad}"
    assert opcp_error_constructions((REPO / OPCP_ERROR_HOME).read_text())


def test_the_opcp_error_checker_finds_planted_bodies() -> None:
    planted = ('def f(exc):\n'
               '    """Answers {"errorMessages": [...]}."""\n'
               '    return JSONResponse({"errorMessages": [exc.message], "traceId": "x"}, status_code=404)\n'
               'body = {}\n'
               'body["traceId"] = "y"\n')
    assert opcp_error_constructions(planted) == [3, 5]


# -- the CSR is parsed once ---------------------------------------------------------------------------------


@pytest.fixture()
def parse_count(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every CSR decoding in the process (pki.csr.parse_csr decodes with these two)."""
    count = [0]
    for name in ("load_pem_x509_csr", "load_der_x509_csr"):
        real = getattr(x509, name)

        def counting(data: bytes, *a: object, _real: object = real) -> x509.CertificateSigningRequest:
            count[0] += 1
            return _real(data, *a)  # type: ignore[operator, no-any-return]

        monkeypatch.setattr(x509, name, counting)
    return count


@pytest.mark.parametrize("cert_type", [None, "V2GCertificate"])
def test_ocpp_sign_certificate_parses_the_csr_once(ctx: object, parse_count: list[int],
                                                    cert_type: str | None) -> None:
    """The RA (pki.enrollment.enroll_station) chooses the certificate type and profile from the one parsed
    request; before #23, api/ picked the profile and the CSR was parsed up to three times."""
    from api.app import create_app
    from pki.orgs import create_api_key
    from tests.conftest import csr_pem, org_with_fresh_prefix

    tag = secrets.token_hex(3)
    op = org_with_fresh_prefix(ctx, f"once-{tag}", "cpo", settings={"organization_name": "Test Org"})  # type: ignore[arg-type]
    key = create_api_key(ctx.db, f"once-{tag}")[0]  # type: ignore[attr-defined]
    body: dict[str, object] = {"csr": csr_pem(f"{op}*E{tag.upper()}", dc="CPO").decode()}
    if cert_type:
        body["certificateType"] = cert_type
    with TestClient(create_app(ctx)) as client:  # type: ignore[arg-type]
        before = parse_count[0]
        r = client.post("/ocpp/v201/sign-certificate", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    assert parse_count[0] - before == 1
