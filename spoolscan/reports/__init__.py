"""Canned reports over the public SQL schema (the views of ``docs/sql.md``).

Each report is one SQL query that runs unchanged on SQLite and PostgreSQL, so an admin
can run the same thing by hand (``spoolscan report NAME --format sql`` prints it with the
time range written in).  ``catalog`` has the queries, ``query`` runs them, ``render``
makes text (table, CSV, JSON), ``html`` and ``charts`` the HTML page.

The package itself loads only the catalog (no SQLAlchemy): the command line lists the
reports without paying for the database layer; ``produce`` runs and renders them.
"""

from spoolscan.reports.catalog import ALIASES, ALL, FORMATS, REPORTS, Report, resolve, selected

__all__ = ["ALIASES", "ALL", "FORMATS", "REPORTS", "Report", "resolve", "selected"]
