from pki.store.db import Database, utcnow

__all__ = ["Database", "utcnow"]
