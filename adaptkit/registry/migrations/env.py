"""Alembic's entry point for adaptkit's registry migrations.

adaptkit runs these itself when it opens a registry (see adaptkit/registry/db.py), on a connection that already holds
the registry's write lock and an open transaction; there is no alembic.ini and no offline (SQL script) mode.
"""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=context.config.attributes.get("target_metadata"),
                  render_as_batch=True)  # SQLite changes columns by copying the table; batch mode does that
with context.begin_transaction():
    context.run_migrations()
