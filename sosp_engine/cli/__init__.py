"""`python -m sosp_engine`: the verbs, one module per group, with the shared argument and output helpers."""
