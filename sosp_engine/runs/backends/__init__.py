"""Where a job runs: a process on this machine (local) or a task on a Ray cluster (ray); neither imports the
job runner."""
