"""Alembic environment: runs on the connection relay.store.database.migrate hands over."""

from alembic import context

from relay.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # invoked from the alembic command line
    from sqlalchemy import create_engine

    engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
    connection = engine.connect()

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
