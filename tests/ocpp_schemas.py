"""The official OCPP JSON schemas (shipped in PyPI's `ocpp` package: ocpp/v16, v201, v21 /schemas), for
checking that what /ocpp/* answers is exactly the message a CSMS forwards to a station: a strict station
(libocpp) validates what it receives against these, with `additionalProperties: false`."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

_DIRS = {"1.6": "v16", "2.0.1": "v201", "2.1": "v21"}
# OCPP 1.6 names its request schemas without the Request suffix (DataTransfer.json, DataTransferResponse.json).
_V16_NAMES = {"DataTransferRequest": "DataTransfer"}


@cache
def _validator(version: str, message: str) -> Any:
    name = _V16_NAMES.get(message, message) if version == "1.6" else message
    text = resources.files("ocpp").joinpath(_DIRS[version], "schemas", f"{name}.json").read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def errors(version: str, message: str, payload: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in _validator(version, message).iter_errors(payload)]


def check(version: str, message: str, payload: Any) -> Any:
    """Assert ``payload`` is a valid OCPP ``version`` ``message`` (e.g. "2.0.1", "CertificateSignedRequest");
    returns it for chaining."""
    found = errors(version, message, payload)
    assert not found, f"not a valid OCPP {version} {message}: {found}\n{json.dumps(payload)[:600]}"
    return payload
