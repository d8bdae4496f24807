"""Alembic environment: runs on the engine handed over by pki.store.db.Database.migrate()."""

from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlmodel import SQLModel

import pki.store.models  # noqa: F401  (registers the tables on SQLModel.metadata)
import pki.store.models_lifecycle  # noqa: F401  (lifecycle workers' tables, migration 0003)
import pki.store.models_truststore  # noqa: F401  (trust-store plans and root campaigns, migration 0006)

config = context.config
target_metadata = SQLModel.metadata


def run() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        engine = engine_from_config(
            config.get_section(config.config_ini_section) or {}, prefix="sqlalchemy.", poolclass=pool.NullPool
        )
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run()
