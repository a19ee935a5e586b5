"""`python -m nats_cron_cli` runs the CLI (used by tests to start real processes)."""

from nats_cron_cli.app import main

main()
