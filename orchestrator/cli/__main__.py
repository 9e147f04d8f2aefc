"""`python -m orchestrator.cli ...`: the same as `orch ...` (Docker and Azure ML jobs run it this way)."""

from orchestrator.cli.main import main

main()
