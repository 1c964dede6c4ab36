"""Atomic writes and training checkpoints: a folder either appears whole or not at all.

Write into a temporary sibling, fsync every file, then ``os.replace`` it into place, so a crash
leaves the previous good version (or nothing), never a half-written folder. A training
checkpoint (``save_checkpoint``) holds every piece of state an exact resume needs, tensors in
safetensors and the rest in JSON (no pickle), with a sha256 manifest that ``latest_checkpoint``
verifies: a torn or corrupted checkpoint is skipped with a warning, never loaded silently.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import CheckpointError, ConfigError


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` atomically, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)  # make the rename itself durable
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` via a temp file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_pretrained_atomic(out_dir: str | Path, model: Any, tokenizer: Any | None = None) -> Path:
    """``save_pretrained`` (safetensors) of a model (and tokenizer) into ``out_dir`` atomically."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------
# Training checkpoints: DIR/step-XXXXXX/{tensors.safetensors, state.json, manifest.json}
# ----------------------------------------------------------------------------------------------
# Tensors (weights, optimizer moments, RNG states) go to safetensors, everything else to JSON:
# nothing is pickled, so loading a checkpoint never runs code. The manifest (written last)
# holds the sha256 of every file; a checkpoint whose manifest is missing or disagrees is torn.
TENSORS, STATE, MANIFEST = "tensors.safetensors", "state.json", "manifest.json"
PREFIX = "step-"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write ``root/step-{step:06d}`` atomically (tmp dir, fsync, rename) and keep the newest ``keep``."""
    from safetensors.torch import save_file
    path = Path(root) / f"{PREFIX}{step:06d}"
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(state, sort_keys=True), encoding="utf-8")
        files = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                 for name in (TENSORS, STATE)}
        (tmp / MANIFEST).write_text(json.dumps({"format": 1, "step": step, "files": files}, indent=1))
    stale = [p for p in Path(root).iterdir() if p.name.startswith(f".{PREFIX}")]  # torn by a crash
    for old in stale + (list_checkpoints(root)[:-keep] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(root: str | Path) -> list[Path]:
    """``step-*`` folders under ``root``, oldest first (temporary ``.step-*`` folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check the manifest and every file's size and sha256; return the manifest or raise CheckpointError."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST} (torn write?)") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: {MANIFEST} is not a valid manifest") from None
    for name in (TENSORS, STATE):
        if name not in files:
            raise CheckpointError(f"{path}: {MANIFEST} does not list {name}")
        target = path / name
        if not target.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if target.stat().st_size != files[name]["bytes"]:
            raise CheckpointError(f"{path}: {name} has {target.stat().st_size} bytes, manifest says "
                                  f"{files[name]['bytes']} (truncated?)")
        if sha256_file(target) != files[name]["sha256"]:
            raise CheckpointError(f"{path}: {name} fails its sha256 checksum (corrupted)")
    return manifest


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify, then read (tensors, state) of one checkpoint folder."""
    from safetensors.torch import load_file
    path = Path(path)
    verify_checkpoint(path)
    return load_file(str(path / TENSORS)), json.loads((path / STATE).read_text(encoding="utf-8"))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; broken newer ones are skipped with a warning.

    Returns None when there is none at all; raises CheckpointError when every one is broken.
    """
    found = list_checkpoints(root)
    errors = []
    for path in reversed(found):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            errors.append(str(e))
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
    if found:
        raise CheckpointError(f"{root}: no valid checkpoint among {len(found)} ({errors[-1]})")
    return None


# Fields a resumed run may change: they do not alter what is computed.
RESUME_FREE = {"save_every", "keep_checkpoints", "log_every", "eval_every", "num_threads", "trace"}


def check_resume_config(saved: dict[str, Any], now: dict[str, Any], where: str) -> None:
    """Raise ConfigError naming the first field (bar RESUME_FREE) where ``now`` differs from ``saved``."""
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            check_resume_config(a, b, f"{where}{key}.")
        elif key not in RESUME_FREE and a != b:
            raise ConfigError(f"--resume: {where}{key}={b!r} differs from the interrupted run's {a!r} "
                              "(resume with the same configuration)")


# ----------------------------------------------------------------------------------------------
# Training state <-> (tensors, JSON): weights, optimizer, LR schedule, every RNG
# ----------------------------------------------------------------------------------------------
def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as tensors named ``optimizer.{param}.{key}`` + a JSON structure."""
    sd = optimizer.state_dict()
    tensors, state = {}, {}
    for pid, entry in sd["state"].items():
        state[str(pid)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value
                value = {"__tensor__": f"optimizer.{pid}.{key}"}
            state[str(pid)][key] = value
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        structure: dict[str, Any]) -> None:
    def value(v: Any) -> Any:
        return tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v
    state = {int(pid): {k: value(v) for k, v in entry.items()} for pid, entry in structure["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": structure["param_groups"]})


def rng_to_flat(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """python, numpy, torch CPU (+ CUDA) and the given generators' states."""
    import numpy as np
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(keys.astype(np.int64)),
               **{f"rng.gen.{name}": g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss_next = random.getstate()
    meta = {"python": [version, list(internal), gauss_next], "numpy": [kind, pos, has_gauss, gauss]}
    return tensors, meta


def rng_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  generators: dict[str, torch.Generator]) -> None:
    import numpy as np
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    for name, g in generators.items():
        g.set_state(tensors[f"rng.gen.{name}"])


def capture_state(params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scheduler: Any,
                  generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) of trainable weights, optimizer, LR scheduler and every RNG: an exact resume point."""
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    rng_tensors, rng_meta = rng_to_flat(generators)
    tensors = {**{f"param.{k}": v for k, v in params.items()}, **opt_tensors, **rng_tensors}
    return tensors, {"optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta}


def restore_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], params: dict[str, torch.Tensor],
                  optimizer: torch.optim.Optimizer, scheduler: Any, generators: dict[str, torch.Generator]) -> None:
    """Inverse of :func:`capture_state`: copy weights in place, load optimizer/scheduler/RNG states."""
    saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
    if saved != set(params):
        diff = sorted(saved ^ set(params))
        raise CheckpointError(f"checkpoint weights do not match the model (first difference: '{diff[0]}')")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
    optimizer_from_flat(optimizer, tensors, meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    rng_from_flat(tensors, meta["rng"], generators)
