"""The use cases: one function per request, each one unit of work (one transaction), with
who-may-do-what (authz) checked before the domain decides. Imports the domain and the adapters,
never an entrypoint."""
