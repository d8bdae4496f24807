"""The Context: what one process works with (settings, database, key store, profiles, engine and the
collaborators around it). Built only by the composition root, pki/wiring.py (``build_context``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsm.keystore import KeyStore
from pki.config import Settings
from pki.crl import CrlCache, CrlScheduler
from pki.issuance import Engine
from pki.lifecycle_policy import Lifecycle
from pki.ocsp.responder import OcspResponder
from pki.outbox import Dispatcher
from pki.profiles import Hierarchy, ProfileSet, load_hierarchy
from pki.store.db import Database


@dataclass
class Context:
    settings: Settings
    db: Database
    keystore: KeyStore
    profiles: ProfileSet
    engine: Engine
    lifecycle: Lifecycle  # policies/lifecycle.yaml and the engine that knows its extra profiles
    outbox: Dispatcher  # sends outbox rows after commit, once a process starts it (workers/outbox.py)
    ocsp: OcspResponder  # RFC 6960 answers, pre-signing and re-signing (pki/ocsp/)
    crl_cache: CrlCache  # the latest CRL per CA, served by /crl/<ca>.crl
    crl_scheduler: CrlScheduler  # regenerates a CRL in the background after a revocation
    # CPS leaves and eMSP names every contract installation looks up (pki/cps/service.py), dropped on
    # revocation by an engine observer.
    cps_cache: dict[str, tuple[float, Any]] = field(default_factory=dict)
    # The standalone OCSP responder (api/ocsp_app.py): no CA key (engine.ca_keys False), so no CRL is
    # generated here either; it answers from OCSP signer keys and stored CRLs.
    responder_only: bool = False

    def hierarchy(self, path: Path | None = None) -> Hierarchy:
        p = path or self.settings.hierarchy_file or (self.settings.policies_dir / "hierarchy.yaml")
        return load_hierarchy(p, self.profiles)


__all__ = ["Context"]
