"""Talking to the database: connections and tables (storage), the unit of work on SQLite and
PostgreSQL and its repositories (prebuilt SQL for sessions, invoices, programmes, the credit
ledger, the event feed and its request_id records), schema migrations and backups. Implements
what the service layer asks of storage (service_layer/repositories.py, unit_of_work.py);
imports the service layer and the domain, never an entrypoint."""
