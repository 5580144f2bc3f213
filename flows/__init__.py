"""Prefect flows and the `ifledger` command line. Orchestration only: no maths here."""
