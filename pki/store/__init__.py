from pki.store import models_lifecycle  # noqa: F401  (registers the lifecycle tables on the metadata)
from pki.store.db import Database, utcnow

__all__ = ["Database", "utcnow"]
