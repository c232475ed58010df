"""Run management: the workspace store, background jobs, their backends, stored analyses, consent to user code."""
