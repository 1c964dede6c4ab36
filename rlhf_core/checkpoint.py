"""Atomic writes and training checkpoints: a folder either appears whole or not at all.

Write into a temporary sibling, fsync every file, then ``os.replace`` it into place, so a crash
leaves the previous good version (or nothing), never a half-written folder. A training
checkpoint (``save_checkpoint``) holds every piece of state an exact resume needs, tensors in
safetensors and the rest in JSON (no pickle), with a sha256 manifest that ``latest_checkpoint``
verifies: a torn or corrupted checkpoint is skipped with a warning, never loaded silently.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load, load_file, save, save_file

from . import distributed as D, fsdp
from .errors import CheckpointError, ConfigError, DiskFullError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _honour_umask(path: Path, is_dir: bool) -> None:
    """mkstemp / mkdtemp create 0600 / 0700; give the finished file or folder the permissions an ordinary
    ``open`` / ``mkdir`` would (0666 / 0777 less the umask), so collaborators and servers can read it."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _is_disk_full(e: BaseException) -> bool:
    """An OSError with ENOSPC / EDQUOT, or a library's wrapper of one (safetensors raises its own type)."""
    return (isinstance(e, OSError) and e.errno in NO_SPACE) or "No space left on device" in str(e)


def _disk_full(path: Path, e: BaseException) -> DiskFullError:
    kept = "the previous version there is intact" if path.exists() else "nothing was written there"
    return DiskFullError(f"{path}: no space left on device while writing it ({type(e).__name__}); {kept}. "
                         "Free some space and rerun (with --resume to continue a run from its last checkpoint)")


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
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp's 0700, and libraries that write 0600 (safetensors)
            if not p.is_symlink():
                _honour_umask(p, is_dir=p.is_dir())
        fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)  # make the rename itself durable
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(e):
            raise _disk_full(path, e) from e
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
        _honour_umask(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _is_disk_full(e):
            raise _disk_full(path, e) from e
        raise


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
    path = Path(path)
    verify_checkpoint(path)
    return load_file(str(path / TENSORS)), json.loads((path / STATE).read_text(encoding="utf-8"))


def load_for_resume(root: str | Path, config: dict[str, Any], where: str, defaults: dict[str, Any] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, state) of the newest valid checkpoint under ``root`` (None: there is none), after
    checking that ``config`` is the configuration that wrote it (bar RESUME_FREE fields; settings
    newer than the checkpoint match at their ``defaults``, see :func:`check_resume_config`).

    Under torchrun every rank reads the checkpoint itself, and all must pick the same one: the
    output dir has to be on a filesystem every node can read.
    """
    path = latest_checkpoint(root)
    names = [n.decode() or "none" for n in D.all_gather_bytes(path.name.encode() if path else b"")]
    if len(set(names)) > 1:
        raise CheckpointError(f"{root}: ranks see different checkpoints ({', '.join(names)}); --resume under "
                              "torchrun needs the output dir on a filesystem every node can read")
    if path is None:
        return None
    tensors, meta = load_checkpoint(path)
    try:
        check_resume_config(meta.get("config", {}), config, where, defaults)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return tensors, meta


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
# (``parallel``: DDP and FSDP2 compute the same steps and write the same full-tensor checkpoints.)
RESUME_FREE = {"save_every", "keep_checkpoints", "log_every", "eval_every", "num_threads", "trace", "parallel",
               "device"}
# Settings a resume may raise (never lower): a finished PPO run extended with --resume and a larger
# ppo.num_iterations goes on from its last checkpoint, its LR schedule re-planned over the new length.
RESUME_GROWABLE = {"num_iterations"}


def check_resume_config(saved: dict[str, Any], now: dict[str, Any], where: str,
                        defaults: dict[str, Any] | None = None) -> None:
    """Raise ConfigError naming the first field (bar RESUME_FREE) where ``now`` differs from ``saved``.

    ``defaults`` (same nesting as ``now``): a field the saved configuration does not have (it was
    written before the setting existed) matches when ``now`` holds its default, the behaviour the
    interrupted run had.
    """
    defaults = defaults or {}
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(key)
            check_resume_config(a, b, f"{where}{key}.", sub if isinstance(sub, dict) else None)
        elif key not in saved and key in defaults and b == defaults[key]:
            continue
        elif key in RESUME_GROWABLE and isinstance(a, int) and isinstance(b, int) and b < a:
            raise ConfigError(f"--resume: {where}{key}={b!r} is less than the interrupted run's {a!r} (a run can be "
                              "extended, not shortened)")
        elif key not in RESUME_FREE | RESUME_GROWABLE and a != b:
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
    """Inverse of :func:`optimizer_to_flat`; full moments are re-sharded like FSDP2 parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state ids index this list

    def value(v: Any, param: torch.Tensor) -> Any:
        return fsdp.shard_like(tensors[v["__tensor__"]], param) if isinstance(v, dict) and "__tensor__" in v else v
    state = {int(pid): {k: value(v, params[int(pid)]) for k, v in entry.items()}
             for pid, entry in structure["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": structure["param_groups"]})


def rng_to_flat(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """python, numpy, torch CPU (+ CUDA) and the given generators' states."""
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


def _pack(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """(tensors, JSON) as one blob: 8-byte JSON length, JSON, safetensors bytes (no pickle)."""
    head = json.dumps(meta).encode()
    return len(head).to_bytes(8, "little") + head + save({k: v.contiguous() for k, v in tensors.items()})


def _unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    n = int.from_bytes(data[:8], "little")
    return load(data[8 + n:]), json.loads(data[8:8 + n])


def rng_all_ranks(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`rng_to_flat` of this process, plus under torchrun every other rank's (tensors
    ``rank{r}.rng.*``, JSON under ``rank{r}``) and ``world_size``.

    A collective: every rank calls it (rank 0 then writes the result). Ranks differ in their
    sampling generators (PPO seeds them ``seed + rank``) and in anything dropout consumed.
    """
    tensors, meta = rng_to_flat(generators)
    parts = D.all_gather_bytes(_pack(tensors, meta))
    if D.is_main():
        for r, data in enumerate(parts[1:], start=1):
            rank_tensors, meta[f"rank{r}"] = _unpack(data)
            tensors.update({f"rank{r}.{k}": v for k, v in rank_tensors.items()})
    meta["world_size"] = len(parts)
    return tensors, meta


def rng_of_this_rank(tensors: dict[str, torch.Tensor], meta: dict[str, Any]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """This rank's part of :func:`rng_all_ranks`'s output, and whether it is really this rank's.

    With another world size than the checkpoint's, every rank gets rank 0's states (False).
    """
    saved, rank = int(meta.get("world_size", 1)), D.rank()
    if saved != D.world_size():
        return tensors, meta, False
    if rank == 0:
        return tensors, meta, True
    prefix = f"rank{rank}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta[f"rank{rank}"], True


def _full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FSDP2 shards all-gathered one at a time onto rank 0's CPU (every rank takes part; the others
    drop the gathered copies). Plain tensors pass through."""
    out = {}
    for name, t in tensors.items():
        full = fsdp.full_tensor(t)
        if full is t:
            out[name] = t
        elif D.is_main():
            out[name] = full.detach().cpu()
    return out


def capture_state(params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, scheduler: Any,
                  generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) of trainable weights, optimizer, LR scheduler and every RNG of every rank:
    an exact resume point. Under torchrun a collective (every rank calls it; rank 0's result is the
    checkpoint). FSDP2-sharded weights and moments are saved whole, so a checkpoint does not
    depend on the world size or on ``parallel``."""
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    rng_tensors, rng_meta = rng_all_ranks(generators)
    tensors = {**_full({f"param.{k}": v for k, v in params.items()}), **_full(opt_tensors), **rng_tensors}
    return tensors, {"optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta}


def restore_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], params: dict[str, torch.Tensor],
                  optimizer: torch.optim.Optimizer, scheduler: Any, generators: dict[str, torch.Generator]) -> bool:
    """Inverse of :func:`capture_state`: copy weights in place, load optimizer/scheduler/RNG states.

    Returns True when each rank got its own RNG states back (same world size as the checkpoint:
    an exact resume); False after a warning when the world size changed (every rank then starts
    from rank 0's states; weights, optimizer and schedule are shared state and load either way).
    """
    saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
    if saved != set(params):
        diff = sorted(saved ^ set(params))
        raise CheckpointError(f"checkpoint weights do not match the model (first difference: '{diff[0]}')")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(fsdp.shard_like(tensors[f"param.{name}"], p))  # FSDP2: this rank's shard
    optimizer_from_flat(optimizer, tensors, meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    rng_tensors, rng_meta, exact = rng_of_this_rank(tensors, meta["rng"])
    rng_from_flat(rng_tensors, rng_meta, generators)
    if not exact and D.is_main():
        warnings.warn(f"checkpoint written by {meta['rng'].get('world_size', 1)} ranks, resumed on {D.world_size()}: "
                      "weights, optimizer, schedule and data order go on, per-rank random states (sampling, "
                      "dropout) do not, so this is not the uninterrupted run", stacklevel=2)
    return exact
