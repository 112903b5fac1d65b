"""The instances this CLI created (a local JSON file, mode 0600): the only ones it acts on
without being given an id. Holds each instance's gateway token."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

DEFAULT_PATH = "~/.config/abliterate/vast-instances.json"


def default_path() -> Path:
    return Path(os.environ.get("ABLITERATE_VAST_STATE") or DEFAULT_PATH).expanduser()


class State:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path).expanduser() if path else default_path()
        self.instances: dict[str, dict] = {}
        if self.path.exists():
            data = json.loads(self.path.read_text() or "{}")
            self.instances = {str(k): v for k, v in data.get("instances", {}).items()}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"instances": self.instances}, fh, indent=2, sort_keys=True)
        os.replace(tmp, self.path)

    def add(self, instance_id: int, **record) -> None:
        self.instances[str(instance_id)] = {"created_at": time.time(), **record}
        self.save()

    def remove(self, instance_id: int) -> None:
        if self.instances.pop(str(instance_id), None) is not None:
            self.save()

    def owns(self, instance_id: int) -> bool:
        return str(instance_id) in self.instances

    def get(self, instance_id: int) -> dict:
        return self.instances.get(str(instance_id), {})
