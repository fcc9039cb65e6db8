"""Throwaway local services for the tests and benchmarks: a Prefect server and a multi-node Ray on
127.0.0.1, started and stopped by PID. Not part of the installed package."""
