"""Chaos tests: real `nats-cron serve` processes under faults, on one server and a cluster.

`harness` runs a scenario, `analysis` defines what is counted and the pass bar,
`proxy` and `procs` hold the moving parts. Short CI version: `tests/chaos/test_chaos.py`;
long version: `python -m tests.chaos --minutes 5 --topology both`.
"""
