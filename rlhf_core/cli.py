"""`rlhf pretrain|sft|reward|ppo|pipeline` — a config file plus dotted overrides; `rlhf report DIR`.

Every config field is a flag (`--sft.learning_rate 1e-4`), listed with its help text by
`rlhf PHASE --help`. Errors a user can cause print one line and exit with code 2
(`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

# Without a GPU, Triton kernels run only in Triton's interpreter (``--ppo.kernel_backend triton``:
# slow, for checking). triton.jit picks compiled or interpreted when a kernel is decorated, and
# transformers imports triton.language while this package loads, so the switch comes first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import distributed, signals  # noqa: E402
from .config import PHASES, ConfigBase, PipelineConfig, load_config_file  # noqa: E402
from .errors import ConfigError, RLHFError  # noqa: E402
from .pipeline import (PHASE_ORDER, preflight, prepare_output_dir, run_phase_command, run_pipeline,  # noqa: E402
                       settle_replaced)
from .presets import PRESETS, get_preset  # noqa: E402
from .report import regenerate  # noqa: E402
from .trackers import parse_report_to  # noqa: E402

# Shortcut flags for the common paths: --model, --data, ... map to the phase's own field.
SHORTCUTS: dict[str, dict[str, str]] = {
    "pretrain": {"model": "model", "data": "data", "tokenizer": "tokenizer"},
    "sft": {"model": "model", "data": "data"},
    "reward": {"model": "model", "data": "data", "tokenizer": "tokenizer"},
    "ppo": {"policy": "policy", "reward": "reward", "prompts": "prompts", "eval-prompts": "eval_prompts",
            "gold": "gold"},
}
DESCRIPTIONS = {
    "pretrain": "Phase 0: domain causal-LM pretraining (group_texts blocks, held-out perplexity).",
    "sft": "Phase 1: supervised fine-tuning (full, LoRA or QLoRA), loss on response tokens only.",
    "reward": "Phase 2: pairwise Bradley-Terry reward model, held-out accuracy and margin.",
    "ppo": "Phase 3: PPO with a value head and a KL-penalized reward.",
    "pipeline": "Phases 0 -> 1 -> 2 -> 3 on the embedded task (or your data), each output the next's input.",
    "report": "Rebuild DIR/report.md (curves, summary, the PPO run's health) from DIR/metrics.jsonl: for a "
              "finished, running or killed run.",
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "").upper()


def _add_section_flags(parser: argparse.ArgumentParser, section: str, cls: type[ConfigBase]) -> None:
    group = parser.add_argument_group(f"{section} settings (--{section}.FIELD VALUE)")
    types = cls.field_types()
    for name, default, help_text in cls.help_lines():
        group.add_argument(f"--{section}.{name}", dest=f"override:{section}.{name}", default=argparse.SUPPRESS,
                           metavar=_type_name(types[name]), help=f"{help_text} (default: {default!r})")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors (unknown flag, missing value) as one line and exit code 2, like every user error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="rlhf", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = sub.add_parser("report", help=DESCRIPTIONS["report"], description=DESCRIPTIONS["report"],
                            allow_abbrev=False)
    report.add_argument("output_dir", help="a run folder (metrics.jsonl; summary.json if the run finished)")
    report.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    report.add_argument("--report-to", default="none", metavar="TRACKERS",
                        help="also export metrics.jsonl to these trackers (tensorboard, wandb, trackio)")
    for command in ("pretrain", "sft", "reward", "ppo", "pipeline"):
        p = sub.add_parser(command, help=DESCRIPTIONS[command], description=DESCRIPTIONS[command],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
        p.add_argument("--config", help="JSON or YAML file with sections seed, preset, model, task, pretrain, sft, reward, ppo")
        p.add_argument("--output-dir", required=True, help="folder for checkpoints, metrics.jsonl, summary.json")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output dir made by rlhf")
        p.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir from its newest valid checkpoint")
        p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
        p.add_argument("--seed", default=argparse.SUPPRESS, help="seed for every phase (overrides the sections' seeds)")
        p.add_argument("--report-to", default=argparse.SUPPRESS, metavar="TRACKERS",
                       help="also log to none, tensorboard, wandb, trackio (comma-separated; offline, in the run "
                            "folder; the .[track] extra)")
        p.add_argument("--project", default=argparse.SUPPRESS, help="the trackers' project (W&B, trackio; "
                                                                     "default rlhf-core)")
        p.add_argument("--run-name", default=argparse.SUPPRESS, help="the trackers' run name (default: the output "
                                                                      "folder's name)")
        p.add_argument("--tags", default=argparse.SUPPRESS, help="W&B tags, comma-separated")
        if command == "pipeline":
            p.add_argument("--preset", help="model/data preset (default: the config file's, else 'tiny'): " + "; ".join(
                f"'{name}': {preset.description}" for name, preset in PRESETS.items()))
            p.add_argument("--stop-after", choices=["pretrain", "sft", "reward", "ppo"], default="ppo",
                           help="last phase to run")
            sections = PipelineConfig.SECTIONS
        else:
            for flag, field_name in SHORTCUTS[command].items():
                p.add_argument(f"--{flag}", dest=f"override:{command}.{field_name}", default=argparse.SUPPRESS,
                               metavar="PATH", help=f"same as --{command}.{field_name}")
            sections = ("model", command) if command == "pretrain" else (command,)
        for section in sections:
            _add_section_flags(p, section, type(getattr(PipelineConfig(), section)))
    return parser


def resolve_config(args: argparse.Namespace) -> PipelineConfig:
    """File (if any) → overrides from flags → validate. With --resume the run's saved configuration
    (OUTPUT/config.json) is the base: a resumed run keeps every setting it was started with (a default that
    changed since included), and what the file or the flags set must agree with it (checked later)."""
    data = load_config_file(args.config) if args.config else {}
    saved = Path(args.output_dir) / "config.json"
    if getattr(args, "resume", False) and saved.is_file():
        base = json.loads(saved.read_text(encoding="utf-8"))
        data = {**base, **{k: ({**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v)
                           for k, v in data.items()}}
    preset = getattr(args, "preset", None) or data.get("preset") or "tiny"
    data = get_preset(str(preset)).defaults(data, pipeline=args.command == "pipeline")  # under the file's values
    cfg = PipelineConfig.from_dict(data, source=args.config or "config")
    cfg.preset = str(preset)
    for key in PipelineConfig.TRACKING:
        if hasattr(args, key):
            cfg.apply_override(key, getattr(args, key))
    parse_report_to(cfg.report_to)  # an unknown tracker or a missing extra: before anything is written
    if hasattr(args, "seed"):
        cfg.apply_override("seed", args.seed)
        for phase in PHASES:
            cfg.apply_override(f"{phase}.seed", args.seed)
    for key, raw in vars(args).items():
        if key.startswith("override:"):
            cfg.apply_override(key.split(":", 1)[1], raw)
    cfg.validate()
    return cfg


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.showwarning = one_line_warning
    signals.install()  # SIGTERM: finish the step, checkpoint, exit 143 (rlhf_core/signals.py)
    out, replaced, succeeded = Path(args.output_dir), None, False
    try:
        if args.command == "report":
            print(f"wrote {regenerate(Path(args.output_dir), parse_report_to(args.report_to))}", file=sys.stderr)
            return 0
        cfg = resolve_config(args)
        # Denormal floats (tiny Adam moments, near-zero LoRA grads) slow CPU math ~10x: flush them.
        # Process-wide FP state, so only the CLI sets it, never a library call.
        torch.set_flush_denormal(True)
        pipeline = args.command == "pipeline"
        if distributed.init_from_env() and pipeline and get_preset(cfg.preset).models:
            raise ConfigError(f"rlhf pipeline --preset {cfg.preset} under torchrun is not supported: run its phases "
                              "one by one with torchrun, or the tiny preset (docs/distributed.md)")
        phases = PHASE_ORDER[:PHASE_ORDER.index(args.stop_after) + 1] if pipeline else (args.command,)
        phases = tuple(p for p in phases if not pipeline or p in get_preset(cfg.preset).phases)
        preflight(cfg, phases)  # bad data: fail before writing
        if distributed.is_main():  # the others wait; if rank 0 fails, torchrun stops them
            out, replaced = prepare_output_dir(out, overwrite=args.overwrite, resume=args.resume)
        distributed.barrier()
        t0 = time.time()
        if args.command == "pipeline":
            summary = run_pipeline(cfg, out, stop_after=args.stop_after, resume=args.resume)
        else:
            summary = run_phase_command(args.command, cfg, out, resume=args.resume)
        succeeded = True
        settle_replaced(out, replaced, succeeded)  # before _leave, which may end the process at once
        replaced = None
        main_rank, grouped = distributed.is_main(), distributed.is_initialized()
        distributed.barrier()
        distributed.shutdown()  # leave the group before exit: gloo threads torn down at exit can abort
        if not main_rank:
            return _leave(0, grouped)
        print(f"done in {time.time() - t0:.1f}s: {out}/summary.json", file=sys.stderr)
        for phase, values in summary.items():
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
            print(f"  {phase}: {shown}", file=sys.stderr)
        return _leave(0, grouped)
    except signals.Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        settle_replaced(out, replaced, succeeded=False)  # it checkpointed: the new run replaces the old
        replaced = None
        return _leave(signals.EXIT_CODE, distributed.is_initialized())
    except RLHFError as e:
        if args.debug:
            raise
        note = settle_replaced(out, replaced, succeeded=False)  # in the same line: one line per error
        replaced = None
        print(f"error: {e}" + (f"; {note}" if note else ""), file=sys.stderr)
        return 2
    except OSError as e:  # a disk that fills outside the atomic writes (metrics.jsonl, a tracker's files)
        if args.debug or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {e.filename or args.output_dir}: no space left on device; every checkpoint written is intact "
              "(free some space and rerun with --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:  # --overwrite: the previous run goes only once the new one finished or checkpointed
        note = settle_replaced(out, replaced, succeeded)
        if note:
            print(f"note: {note}", file=sys.stderr)


def _leave(code: int, grouped: bool) -> int:
    """The exit code; after a torchrun run, exit at once (everything is written and flushed).

    Gloo's worker threads can still hold work objects whose tensors reference Python objects;
    destroying them during interpreter finalization aborts the process now and then ("terminate
    called without an active exception", exit -6) even after destroy_process_group, failing a run
    that succeeded. ``os._exit`` skips that finalization.
    """
    if not grouped:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
