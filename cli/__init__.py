"""The `nats-cron` command line (installed as the `nats_cron_cli` package)."""
