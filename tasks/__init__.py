"""Prefect tasks: I/O around pocl_core, the Ray Train launch, artifacts. Tasks pass paths, not tensors."""
