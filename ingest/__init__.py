"""OQMD database -> crystal graph cache (``cgnn ingest``, ``cgnn db init|synth``).

Modules: ``tables`` (SQLAlchemy Core tables of the OQMD schema), ``db`` (URLs without passwords in
messages, engines, schema creation), ``select`` (the reference-CGNN and canonical selection SQL, with a
MySQL 5.7 fallback), ``reader`` (keyset-paginated streaming of rows -> Crystal + targets, retries),
``run`` (``run_ingest``: resumable, sharded, parallel cache build), ``synth`` (SYNTHETIC OQMD-shaped
data), ``cli`` (the commands). Importing this package is cheap; nothing here imports the model.
"""
