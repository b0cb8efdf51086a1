"""LoRA adapters added and removed while the app runs (vLLM's ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``), shared by every replica through a registry file under ``adapter_root``.

A replica that takes a load request checks the adapter (a peft folder under ``adapter_root``, its rank within the
engine's ``max_lora_rank``, its name free), loads it into its engine and records it in
``<adapter_root>/.rp_ray_adapters.json``; the other replicas read that file again when it changed (checked on every
request naming a model and on the model list: one ``stat``) and load or drop what it lists, without a restart.
Adapters of the serve config stay as configured: they cannot be unloaded. The file is replaced whole (written under
a unique name, then renamed), so a reader never sees half of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from rp_ray.character.card import CardError
from rp_ray.character.names import NAME_RULE, is_name
from rp_ray.files import write_atomic
from rp_ray.llm.vllm_engine import adapter_rank

REGISTRY_FILE = ".rp_ray_adapters.json"


def resolve_adapter(root: str | Path, name: str, folder: str) -> Path:
    """The adapter folder ``folder`` under ``root``: a peft folder with safetensors weights, never outside root."""
    if not is_name(name):
        raise CardError(f"adapter name {name!r}: {NAME_RULE}")
    base = Path(root).resolve()
    path = (base / folder).resolve()
    if path != base and base not in path.parents:
        raise CardError(f"adapter {name!r}: {folder!r} resolves outside the adapter root {base}")
    if not (path / "adapter_config.json").is_file():
        raise CardError(f"adapter {name!r}: {path} is not a peft adapter folder (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").is_file():
        raise CardError(f"adapter {name!r}: {path} has no adapter_model.safetensors (pickle weights are refused)")
    return path


def check_rank(name: str, path: str | Path, max_rank: int) -> None:
    """Refuse an adapter whose LoRA rank is above the engine's ``max_lora_rank`` (vLLM would fail at chat time)."""
    rank = adapter_rank(path)
    if rank > max_rank:
        raise CardError(
            f"adapter {name!r} has LoRA rank {rank}; the engine serves ranks up to max_lora_rank={max_rank}: raise "
            f"max_lora_rank in the serve config (and redeploy) or train the adapter with a rank <= {max_rank}"
        )


class AdapterRegistry:
    """The runtime adapters of an app: name -> absolute folder, in ``<root>/.rp_ray_adapters.json``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.file = self.root / REGISTRY_FILE
        self._seen: tuple[int, int, int] | None = None

    def read(self) -> dict[str, str]:
        """What the file lists (nothing when it is absent or unreadable: the configured adapters still serve)."""
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {n: p for n, p in data.items() if isinstance(p, str)}

    def changed(self) -> bool:
        """Whether the file changed since the last call: every write replaces it, so its inode changes too."""
        try:
            st = self.file.stat()
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            seen = None
        if seen == self._seen:
            return False
        self._seen = seen
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serializes the replicas' read-modify-write of the file (an advisory lock on a file beside it)."""
        with open(self.root / f"{REGISTRY_FILE}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def update(self, change: Callable[[dict[str, str]], None]) -> dict[str, str]:
        """Apply ``change`` to the listed adapters and write the result (whole: ``write_atomic``); the new table."""
        with self._locked():
            table = self.read()
            change(table)
            write_atomic(self.file, json.dumps(table, indent=2, sort_keys=True))
        return table
