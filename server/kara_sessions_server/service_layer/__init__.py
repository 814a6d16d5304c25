"""The use cases: one function per request, each one unit of work (one transaction), with
who-may-do-what (authz) checked before the domain decides. What they need of storage is said
here (repositories.py, unit_of_work.py) and built in the adapters; imports only the domain."""
