"""How runs of the POCL flow are started: prefect.yaml (work pool), serve.py (a long-running process)."""
