"""What keeps runs from losing or leaking anything: one writer per output directory, secrets kept
out of files, and the target's identity by content.

- ``OutputLock``: an advisory lock (``flock``) on ``OUTPUT/.deepspec.lock`` held for the whole
  command; a second command on the same folder is refused with the holder's pid. The lock file
  is removed on release, so a refused or finished command leaves the folder as it found it.
- ``redacted_yaml``: the config as YAML with every secret-looking field (``*api_key``,
  ``*token``, ``*secret``, ``*password``) replaced by a placeholder. Keys are read from the
  environment at run time (``regen.api_key_env``), never written.
- ``weights_fingerprint``: a sha256 over a deterministic sample of every parameter and buffer
  of a model (names, shapes and ~4k evenly spaced values per tensor, compared in bf16 so one
  checkpoint loaded in fp32 or bf16 gives one fingerprint). A fine-tuned copy of a model
  changes it; the name and shapes alone do not.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

LOCK_FILE = ".deepspec.lock"
SECRET_SUFFIXES = ("api_key", "token", "secret", "password")
REDACTED = "<redacted>"
SAMPLES_PER_TENSOR = 4096

# Set once per command from `target.accept_changed_weights`: accept a cache, journal or drafter
# recorded for the same target name and shapes but other weights.
_accept_changed_weights = False


def accept_changed_weights(value: bool | None = None) -> bool:
    """Read (and, given a value, set) whether a target whose weights changed is accepted."""
    global _accept_changed_weights
    if value is not None:
        _accept_changed_weights = bool(value)
    return _accept_changed_weights


class LockHeld(RuntimeError):
    """Another process holds the output directory."""


class OutputLock:
    """``with OutputLock(folder):`` -- exclusive, non-blocking, released on exit (or process death)."""

    def __init__(self, folder: str | Path, command: str = "deepspec"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise LockHeld(f"output_dir={self.folder} is in use by another deepspec process ({holder}); "
                               f"wait for it to finish or choose another output_dir (one writer per "
                               f"folder)") from None
            try:  # the holder may have removed the file between our open and our lock: retry on the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, {self.command}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def is_secret_key(key: str) -> bool:
    key = key.lower()
    return key.endswith(SECRET_SUFFIXES) and not key.endswith("_env")


def _redact(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else _redact(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_redact(v) for v in node]
    return node


def redacted(cfg: DictConfig) -> dict:
    """``cfg`` as a plain dict (resolved) with every secret field replaced by a placeholder."""
    return _redact(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def redacted_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(redacted(cfg)))


def _sample(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLES_PER_TENSOR)
    picked = flat[::stride][:SAMPLES_PER_TENSOR].to("cpu", torch.bfloat16).contiguous()
    return picked.view(torch.int16).numpy().tobytes()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of a deterministic sample of ``model``'s tensors (see the module
    docstring). Tensors on the meta device (offloaded) contribute their name and shape only."""
    h = hashlib.sha256()
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{tuple(t.shape)}\0".encode())
        if t.device.type != "meta" and t.numel():
            h.update(_sample(t))
    return h.hexdigest()[:16]


def weights_mismatch(what: str, recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The refusal message when ``recorded`` and ``current`` target identities name other weights
    (None when they agree, or when a changed target is accepted)."""
    old, new = recorded.get("weights"), current.get("weights")
    if old == new or _accept_changed_weights:
        return None
    made = f"{what} was made for target {recorded.get('name')!r}"
    if recorded.get("source"):
        made += f" loaded from {recorded['source']}"
    now = f"the target now loaded has weights {new}" + (f" (from {current['source']})" if current.get("source")
                                                        else "")
    if old is None:
        detail = (f"but records no weights fingerprint (written by an older deepspec), so it cannot be shown to "
                  f"belong to this target: {now}")
    else:
        detail = f"with weights {old}; {now}: the same name with other weights (a fine-tuned target, another source)"
    return (f"{made} {detail}. Rebuild it for this target, or set target.accept_changed_weights=true if the "
            f"difference is intended")
