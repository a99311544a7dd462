"""Alembic environment for spoolscan.

Used both by `alembic upgrade head` (repo root, alembic.ini) and by `spoolscan db upgrade`,
which passes an open connection in ``config.attributes["connection"]``.
"""

from logging.config import fileConfig

from alembic import context

from spoolscan.store.models import metadata

config = context.config
if config.config_file_name is not None and not config.attributes.get("connection"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata


def _url() -> str:
    from spoolscan.config import load_config

    return config.get_main_option("sqlalchemy.url") or load_config().database.url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return

    from spoolscan.store.db import create_engine_for, foreign_keys_off

    engine = create_engine_for(_url())
    with engine.connect() as conn, foreign_keys_off(conn):
        context.configure(connection=conn, target_metadata=target_metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
