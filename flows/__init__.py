"""Prefect flows that chain the tasks, and the ``pocl`` command line."""
