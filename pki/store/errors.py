"""Database errors as typed PKI errors, so no caller outside pki/store names a SQLAlchemy exception.

A unique constraint refusing a row (SQLAlchemy's IntegrityError) comes out of the repository that wrote it
as :class:`Duplicate` (409 in api/problems.py).

The database refusing a value the client sent (PostgreSQL: a NUL character in text, an integer out of
range for an INTEGER column) is the request's fault, not the server's: every engine of
:class:`pki.store.db.Database` turns the driver's DataError into :class:`InvalidValue` (a 400 problem
body in api/problems.py), whichever path ran the statement (ORM session, Core, pki/store/fast.py).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import DataError, DBAPIError, OperationalError

from pki.errors import PKIError

log = logging.getLogger("v2gpki.store")


# Database errors a retry may cure (a lost connection, a lock timeout, a server restart): workers retry
# their tasks on these (workers/app.py).
TRANSIENT: tuple[type[BaseException], ...] = (OperationalError, DBAPIError)


class InvalidValue(PKIError):
    """A value in the request cannot be stored or searched (NUL character or number out of range)."""

    code = "invalid-request"


def invalid_value(exc: BaseException) -> InvalidValue | None:
    """The typed error for a SQLAlchemy DataError (logged: a server-made value would be a bug), else None."""
    if not isinstance(exc, DataError):
        return None
    log.warning("database refused a request value: %s", type(exc.orig).__name__ if exc.orig else exc)
    return InvalidValue("a value in the request cannot be stored or searched (NUL character or number out of "
                        "range)")


def translate(context: Any) -> BaseException | None:
    """SQLAlchemy ``handle_error`` listener: the exception to raise instead of the DataError it built."""
    return invalid_value(context.sqlalchemy_exception)


class Duplicate(PKIError):
    """A row with the same unique key exists already (the repository's transaction is rolled back)."""

    code = "conflict"


class StorageError(PKIError):
    """The database could not answer (a missing table, a lost connection) where the caller can degrade
    gracefully instead of failing (the console's trust-list page)."""

    code = "storage-error"
