"""Where mallwatt keeps its data: brokers, the embedded warehouse, spools, keys, faust state.

`MALLWATT_HOME` if set; else, when running from a source checkout (the package sits in a
folder with pyproject.toml), the checkout's ignored `var/` (so `make demo` and the tests keep
everything beside the code); else the user's data folder (`$XDG_DATA_HOME/mallwatt`, default
`~/.local/share/mallwatt`). An installed package never writes into its own install folder.
Caches that can be fetched again (Kafka jars) live apart, under MALLWATT_CACHE (infra.kafka_runtime).
"""

from __future__ import annotations

import os
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent


def from_source_checkout() -> bool:
    return (SOURCE_ROOT / "pyproject.toml").is_file() and (SOURCE_ROOT / "pipelines").is_dir()


def home() -> Path:
    env = os.environ.get("MALLWATT_HOME")
    if env:
        return Path(env).expanduser()
    if from_source_checkout():
        return SOURCE_ROOT / "var"
    data = os.environ.get("XDG_DATA_HOME")
    return (Path(data).expanduser() if data else Path.home() / ".local" / "share") / "mallwatt"


def data_dir(*parts: str) -> Path:
    """A folder (not created) under the home, e.g. data_dir("kafka")."""
    return home().joinpath(*parts)
