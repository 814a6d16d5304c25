"""Talking to the database: connections and tables (storage), prebuilt SQL for sessions,
invoices and the credit ledger, request_id records, stored results, page tokens and schema
migrations. Imports the domain, never the service layer or an entrypoint."""
