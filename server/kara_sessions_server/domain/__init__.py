"""The domain: what sessions, payments, credit accounts and invoices are, and the article's
rules for them (policy, the two lifecycles, invoicing). Pure Python: it imports no gRPC, no
database driver and no other layer of this package (pyproject.toml's import-linter contracts)."""
