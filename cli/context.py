"""Read the `nats` CLI's contexts (`~/.config/nats/context/NAME.json`), so that
`nats-cron --context prod ...` connects like `nats --context prod ...` does."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from nats_apscheduler import Connection


class ContextError(Exception):
    """A context that does not exist or cannot be read."""


def contexts_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "nats" / "context"


def selected_context(environ: Mapping[str, str]) -> str | None:
    """The context chosen with `nats context select`, if any."""
    marker = contexts_dir(environ).parent / "context.txt"
    try:
        name = marker.read_text().strip()
    except OSError:
        return None
    return name or None


def load_context(
    name: str, base: Connection, environ: Mapping[str, str] = os.environ
) -> Connection:
    """`base` with the context's non-empty fields laid over it. `name` is a context's
    name, or the path of a context file ending in `.json` (as the `nats` CLI takes)."""
    if name.endswith(".json") and Path(name).is_file():
        path = Path(name)
    elif not name or "/" in name or "\\" in name or name.startswith("."):
        raise ContextError(f"invalid context name {name!r}")
    else:
        path = contexts_dir(environ) / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ContextError(f"unknown context {name!r} (no {path})") from None
    except (OSError, ValueError) as exc:
        raise ContextError(f"cannot read context {name!r}: {exc}") from None
    if not isinstance(data, dict):
        raise ContextError(f"context {name!r} is not a JSON object")

    def get(key: str) -> str | None:
        value = data.get(key)
        return value if isinstance(value, str) and value else None

    return base.override(
        url=get("url"),
        creds=get("creds"),
        user=get("user"),
        password=get("password"),
        token=get("token"),
        nkey=get("nkey"),
        tls_ca=get("ca"),
        tls_cert=get("cert"),
        tls_key=get("key"),
    )
