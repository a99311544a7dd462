"""The SQL store: schema (``models``, migrated by Alembic), repository (``repo``)."""


class StoreError(Exception):
    """The database cannot be used (unreachable, not migrated, misconfigured)."""
