"""`python -m nats_cron_cli` runs the CLI (used by tests to start real processes)."""

from .app import main

main()
