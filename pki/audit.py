"""Append-only, hash-chained audit log (non-repudiation of data at rest): the service face.

Each event's hash = SHA-256(prev_hash || canonical JSON of the event); the chain head sits in one row
that every appender locks, so concurrent processes append in a single order. Checkpoints (the head hash
signed by an audit key in the HSM, pki/audit_sign.py) make a truncated or rewritten chain detectable too.
The chain's storage (statements, the PostgreSQL append function's call, verification's scan) is
pki/store/audit_log.py's; its names are re-exported here, where callers have always found them.
"""

from __future__ import annotations

from pki.store.audit_log import (
    _PG_APPEND,
    GENESIS,
    Entry,
    VerifyResult,
    _stage,
    append,
    append_conn,
    append_statements,
    canonical,
    chain_hash,
    record,
    verify_chain,
)

__all__ = ["GENESIS", "Entry", "VerifyResult", "_PG_APPEND", "_stage", "append", "append_conn", "append_statements",
           "canonical", "chain_hash", "record", "verify_chain"]
