#!/usr/bin/env python
"""Render docs/how_ppo_works.md: one PPO iteration, every number computed from a real run.

    python docs/how_ppo_works.py --check               # ~15 s: trace the committed weights, render
    python docs/how_ppo_works.py --regenerate [RUN]    # ~2 min: rerun the demo first, then as --check

The doc has two sources:

- The demo (``DEMO_ARGS``, what ``make demo`` runs). Its outputs the doc needs are committed in
  docs/data/demo/: the SFT policy and the reward model (``MODEL_FILES`` of RUN/sft and RUN/reward),
  ``RUN_FILES`` (metrics.jsonl for the healthy-ranges section and the figure, summary.json,
  config.json with RUN's path replaced by ``RUN``) and machine.json (the CPU and torch that made them).
  The demo is ~1600 optimizer steps, and float rounding differs per instruction set, so its curves
  differ a little from one CPU to another: the doc reads the committed copy, never a fresh demo.
- One traced PPO iteration (``TRACE_ARGS``) of docs/data/demo/sft against docs/data/demo/reward,
  writing OUTPUT/ppo/trace.json. One iteration from fixed weights reproduces across CPUs to ~1e-6
  relative, inside the digits the doc prints, so both modes rerun it (into a temporary folder).

``--regenerate`` runs the demo into RUN (default: a temporary folder), replaces docs/data/demo/ with
its outputs and redraws docs/img/demo_ppo_curves.png from them; then, like ``--check``, it runs the
trace and renders ``--out``. ``--trace OUTPUT/ppo/trace.json`` renders from an existing trace instead.
Every command is ``sys.executable -m rlhf_core`` in a subprocess.

Inputs are read as JSON only — docs/data/demo's JSON files, OUTPUT/config.json, OUTPUT/metrics.jsonl,
trace.json and the policy's tokenizer.json (to name the sampled tokens) — and this script never imports
rlhf_core, so it does not move when the package's internals do. Before rendering it re-derives every
tensor the doc explains from the ones before it (rewards from scores and kl, GAE, whitening, the
update's ratios and losses, the logged metrics) with the doc's own formulas, and stops with an error if
the trace disagrees: the formulas printed are then the code's. tests/docs/test_how_ppo_works.py runs
``--check`` and compares the result with the committed doc.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "how_ppo_works.md"
DATA_REL = "docs/data/demo"  # the committed demo data, as the doc names it
DATA = REPO / DATA_REL
IMG_NAME = "img/demo_ppo_curves.png"  # relative to docs/

DEMO_ARGS = ["pipeline", "--preset", "tiny", "--output-dir", "{run}", "--overwrite"]
TRACE_ARGS = ["ppo", "--ppo.policy", "{data}/sft", "--ppo.reward", "{data}/reward", "--ppo.max_prompt_length", "32",
              "--ppo.batch_size", "2",
              "--ppo.num_mini_batches", "1", "--ppo.ppo_epochs", "2", "--ppo.response_length", "8",
              "--ppo.num_iterations", "1", "--ppo.trace", "true", "--ppo.seed", "1", "--output-dir", "{out}"]
# What docs/data/demo keeps of a demo run: what from_pretrained and the tokenizer read of each model
# folder (no checkpoints), and the run's own records.
MODELS = ("sft", "reward")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
RUN_FILES = ("metrics.jsonl", "summary.json", "config.json")

# Tolerance of the re-derivations below: the trace rounds every tensor to 6 digits.
TOL = 5e-5
# Two computations of the same quantity that differ by less than this differ by float rounding only
# (logprobs vs ref_logprobs at iteration 1, the first update step's ratio). The doc states this bound
# rather than the 6-digit values themselves, whose last digit is rounding noise that varies per CPU.
FLOAT_NOISE = 1e-5
PRINTS_AS_ZERO = 5e-5  # below this in magnitude a value prints as 0 (0.0000, or 0 in sig3)
MINUS = "\u2212"  # prose uses the typographic minus; code blocks keep ASCII '-'


# ----------------------------------------------------------------------------------------------
# Running the demo and the trace command
# ----------------------------------------------------------------------------------------------

def subprocess_env() -> dict[str, str]:
    """The environment of ``make demo`` made deterministic: offline, no progress bars, one thread."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", RLHF_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("TRITON_INTERPRET", None)  # the test suite's conftest sets it; `make demo` does not
    return env


def rlhf(args: list[str], **fields: Path) -> None:
    """``python -m rlhf_core ARGS`` with ``{run}``/``{data}``/``{out}`` filled in; its stdout dropped."""
    cmd = [sys.executable, "-m", "rlhf_core"] + [a.format(**fields) for a in args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL)


def machine() -> dict[str, str]:
    """The CPU (/proc/cpuinfo's model name) and the torch build that ran the demo, in its environment."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    probe = ("import json, torch; print(json.dumps({'torch': torch.__version__, "
             "'cpu_capability': torch.backends.cpu.get_cpu_capability()}))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True).stdout
    return {"cpu": names[0] if names else (platform.processor() or platform.machine()), **json.loads(out)}


def save_demo_data(run: Path, data: Path) -> None:
    """Replace ``data`` with what the doc reads of the demo run ``run`` (see MODEL_FILES, RUN_FILES)."""
    if data.exists():
        shutil.rmtree(data)
    for model in MODELS:
        (data / model).mkdir(parents=True)
        for name in MODEL_FILES:
            if (run / model / name).is_file():
                shutil.copyfile(run / model / name, data / model / name)
        if not (data / model / "model.safetensors").is_file():
            raise SystemExit(f"how_ppo_works.py: {run / model} has no model.safetensors")
    for name in RUN_FILES:  # RUN's absolute path (in config.json) would only name this machine's folder
        (data / name).write_text((run / name).read_text().replace(str(run), "RUN"))
    (data / "machine.json").write_text(json.dumps(machine(), indent=2) + "\n")
    size = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    print(f"wrote {data} ({size / 2**20:.2f} MiB)", flush=True)


def run_trace(data: Path, out: Path) -> Path:
    """The trace command on ``data``'s models into ``out``; return OUTPUT/ppo/trace.json."""
    rlhf(TRACE_ARGS, data=data.resolve(), out=out.resolve())
    return out / "ppo" / "trace.json"


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a token string uses -> its byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Vocab:
    """Token id -> text, from a byte-level BPE tokenizer.json (read as JSON)."""

    def __init__(self, folder: Path):
        tok = json.loads((folder / "tokenizer.json").read_text())
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        self.id_to_token = {i: t for t, i in tok["model"]["vocab"].items()}
        self.special = {a["id"]: a["content"] for a in tok["added_tokens"]}
        self.id_to_token.update(self.special)
        by_name = {v: k for k, v in self.special.items()}
        self.pad_id, self.eos_id = by_name[cfg["pad_token"]], by_name[cfg["eos_token"]]
        self.pad, self.eos = cfg["pad_token"], cfg["eos_token"]
        self._bytes = bytes_to_unicode()

    def text(self, i: int) -> str:
        if i in self.special:
            return self.special[i]
        return bytes(self._bytes[c] for c in self.id_to_token[i]).decode("utf-8", errors="replace")

    def decode(self, ids: list[int]) -> str:
        return "".join(self.text(i) for i in ids if i not in self.special)


# ----------------------------------------------------------------------------------------------
# Number formatting (the test reads the numbers back, so each is printed one way only)
# ----------------------------------------------------------------------------------------------

def f4(x: float, prose: bool = False) -> str:
    """4 decimals, no negative zero; prose uses U+2212 for the minus."""
    s = f"{x:.4f}"
    if s.startswith("-") and float(s) == 0:
        s = s[1:]
    return s.replace("-", MINUS) if prose else s


def p4(x: float) -> str:
    return f4(x, prose=True)


def signed(x: float, fmt=p4) -> str:
    """+1.01 / −0.85 style (prose)."""
    s = fmt(x)
    return s if s.startswith(MINUS) else "+" + s


def paren(x: float) -> str:
    """A negative operand in parentheses, for hand-computed arithmetic."""
    s = p4(x)
    return f"({s})" if s.startswith(MINUS) else s


def g(x: float) -> str:
    """A hyperparameter as written in a config: 1.0 -> 1, 0.95 -> 0.95, 1e-4 -> 1e-4."""
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    s = repr(float(x))
    if "e" in s:
        mant, exp = s.split("e")
        s = f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    return (MINUS + s[1:]) if s.startswith("-") else s  # a minus sign in prose, exponents stay ASCII


def sig3(x: float) -> str:
    """3 significant digits for the healthy-ranges table; |x| < 5e-5 reads 0 (rounding noise)."""
    if abs(x) < PRINTS_AS_ZERO:
        return "0"
    s = f"{x:.3g}"
    if "e" in s:  # 3 significant digits of a small number, written out
        s = f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"
    return s.replace("-", MINUS)  # 3 significant digits never need an exponent here


def shell_command(args: list[str], width: int = 104, **fields: str) -> list[str]:
    """``rlhf ARGS`` as the doc prints it: lines of at most ``width``, an option kept with its value."""
    words = [a.format(**fields) for a in args]
    groups: list[str] = []
    for w in words[1:]:
        if w.startswith("--") or not groups:
            groups.append(w)
        else:
            groups[-1] += " " + w
    line = f"rlhf {words[0]}"
    indent, lines = " " * len(line), []
    for grp in groups:
        if len(line) + len(grp) + 3 > width:
            lines.append(line + " \\")
            line = indent
        line += " " + grp
    return lines + [line]


def matrix(rows: list[list[float]], indent: int, ints: bool = False) -> str:
    """A (B, T) tensor as a code-block literal; continuation rows aligned under the first."""
    if ints:
        cells = [[str(int(v)) for v in r] for r in rows]
    else:
        cells = [[f4(v) for v in r] for r in rows]
        if any(c.startswith("-") for r in cells for c in r):
            cells = [[c if c.startswith("-") else " " + c for c in r] for r in cells]
    lines = ["[" + ", ".join(r) + "]" for r in cells]
    pad = " " * (indent + 1)
    return "[" + (",\n" + pad).join(lines) + "]"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def vector(xs: list[float]) -> str:
    return "[" + ", ".join(f4(x) for x in xs) + "]"


ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth"]


def ordinal(i: int) -> str:
    return ORDINALS[i] if i < len(ORDINALS) else f"{i + 1}th"


def all_of(n: int) -> str:
    return "both" if n == 2 else f"all {n}"


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


# ----------------------------------------------------------------------------------------------
# Re-deriving the trace with the doc's formulas
# ----------------------------------------------------------------------------------------------

def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"how_ppo_works.py: the trace disagrees with the doc's formula: {what}")


def close(a: float, b: float, tol: float = TOL) -> bool:
    return abs(a - b) <= tol


def all_close(a: list[list[float]], b: list[list[float]], tol: float = TOL) -> bool:
    return all(close(x, y, tol) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def valid(mask: list[list[int]]) -> list[tuple[int, int]]:
    return [(i, t) for i, r in enumerate(mask) for t, m in enumerate(r) if m]


def masked_moments(x: list[list[float]], mask: list[list[int]]) -> tuple[float, float]:
    """Mean and population variance over the valid tokens (masked_mean, masked_var(unbiased=False))."""
    vals = [x[i][t] for i, t in valid(mask)]
    mean = sum(vals) / len(vals)
    return mean, sum((v - mean) ** 2 for v in vals) / len(vals)


def last_valid(row_mask: list[int]) -> int:
    return max((t for t, m in enumerate(row_mask) if m), default=-1)


def gae(rewards, values, mask, gamma, lam):
    """δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t, A_t = δ_t + γλ·m_{t+1}·A_{t+1}, R_t = A_t + V_t."""
    adv, ret = [], []
    for r, v, m in zip(rewards, values, mask):
        T = len(r)
        a, nxt_v, nxt_m, nxt_a = [0.0] * T, 0.0, 0.0, 0.0
        for t in reversed(range(T)):
            if m[t]:
                delta = r[t] + gamma * nxt_v * nxt_m - v[t]
                a[t] = delta + gamma * lam * nxt_m * nxt_a
            nxt_v, nxt_m, nxt_a = (v[t] if m[t] else 0.0), float(m[t]), a[t]
        adv.append(a)
        ret.append([(a[t] + v[t]) if m[t] else 0.0 for t in range(T)])
    return adv, ret


def match_rows(update: dict, tr: dict) -> list[int]:
    """The trace row of each row of an update's minibatch (same response ids; nearest logprobs)."""
    rows, used = [], set()
    for ids, lp in zip(update["response_ids"], update["logprobs"]):
        cands = [i for i, r in enumerate(tr["response_ids"]) if r == ids and i not in used]
        check(bool(cands), "an update row whose response is in no trace row")
        best = min(cands, key=lambda i: sum(abs(a - b) for a, b in zip(lp, tr["logprobs"][i])))
        used.add(best)
        rows.append(best)
    return rows


def check_logged(mine: dict[str, float], logged: dict, where: str) -> None:
    """Each value the doc's formulas give against the one the engine logged."""
    for key, val in mine.items():
        check(close(val, logged[key], 2e-4), f"{where}: {key} logged {logged[key]}, formula gives {val}")


def analyse(data: Path, trace_path: Path) -> dict:
    """Read everything and compute every number the doc prints (asserting the formulas on the way)."""
    tr = json.loads(Path(trace_path).read_text())
    out_dir = Path(trace_path).resolve().parent.parent
    cfg = json.loads((out_dir / "config.json").read_text())["ppo"]
    run_cfg = json.loads((data / "config.json").read_text())
    vocab = Vocab(Path(trace_path).resolve().parent)
    d: dict = {"tr": tr, "cfg": cfg, "run_cfg": run_cfg, "vocab": vocab,
               "machine": json.loads((data / "machine.json").read_text()),
               "summary": json.loads((data / "summary.json").read_text())}

    mask, B = tr["mask"], len(tr["mask"])
    T = len(mask[0])
    d.update(B=B, T=T, n_tok=sum(map(sum, mask)))
    beta, gamma, lam = tr["kl_coef"], cfg["gamma"], cfg["lam"]

    # §1 queries
    qlen = [sum(r) for r in tr["query_mask"]]
    d["qlen"], d["Lq"] = qlen, len(tr["query_mask"][0])
    for row, m in zip(tr["query_ids"], tr["query_mask"]):
        check(all(i == vocab.pad_id for i, k in zip(row, m) if not k), "query padding is not <pad>")
        check(m == sorted(m), "queries are not left-padded")

    # §2 responses: decoded tokens, EOS, truncation
    d["tokens"] = [[vocab.text(i) for i in r] for r in tr["response_ids"]]
    for i, (ids, m) in enumerate(zip(tr["response_ids"], mask)):
        check(vocab.decode([a for a, k in zip(ids, m) if k]) == tr["responses"][i],
              f"row {i}'s tokens do not decode to its response text")
    d["has_eos"] = [any(a == vocab.eos_id for a, k in zip(ids, m) if k) for ids, m in zip(tr["response_ids"], mask)]
    d["resp_len"] = [sum(r) for r in mask]

    # §3 logprobs vs ref_logprobs: k1 = their difference, float noise on iteration 1
    lp, ref = tr["logprobs"], tr["ref_logprobs"]
    check(cfg["kl_estimator"] == "k1", "the trace command's kl_estimator is not k1")
    for i, t in valid(mask):
        check(close(tr["kl"][i][t], lp[i][t] - ref[i][t], 2e-6), f"kl[{i}][{t}] != logprobs - ref_logprobs (k1)")
    d["max_k1"] = max(abs(tr["kl"][i][t]) for i, t in valid(mask))

    # §5 rewards = −β·kl + score on the last valid token
    for i in range(B):
        last = last_valid(mask[i])
        for t in range(T):
            want = (-beta * tr["kl"][i][t] if mask[i][t] else 0.0) + (tr["scores"][i] if t == last else 0.0)
            check(close(tr["rewards"][i][t], want), f"rewards[{i}][{t}] != -beta*kl + score*[last]")

    # §6 GAE
    adv, ret = gae(tr["rewards"], tr["values"], mask, gamma, lam)
    check(all_close(adv, tr["raw_advantages"]), "raw_advantages != GAE(rewards, values)")
    check(all_close(ret, tr["returns"]), "returns != advantages + values")
    r0, L = 0, last_valid(mask[0])
    r, v, a = tr["rewards"][r0], tr["values"][r0], tr["raw_advantages"][r0]
    d["hand"] = {"L": L, "r_L": r[L], "V_L": v[L], "d_L": r[L] - v[L], "A_L": a[L], "r_p": r[L - 1],
                 "V_p": v[L - 1], "d_p": r[L - 1] + gamma * v[L] - v[L - 1], "A_p": a[L - 1]}
    h = d["hand"]
    check(close(h["d_L"], h["A_L"]), "A at the last token != its delta")
    check(close(h["d_p"] + gamma * lam * h["A_L"], h["A_p"]), "A_{L-1} != delta + gamma*lam*A_L")

    # §7 whitening
    mean, var = masked_moments(tr["raw_advantages"], mask)
    std = math.sqrt(var + 1e-8)
    d["w_mean"], d["w_std"] = mean, std
    white = [[(x - mean) / std if m else 0.0 for x, m in zip(ra, rm)] for ra, rm in zip(tr["raw_advantages"], mask)]
    check(all_close(white, tr["advantages"]), "advantages != (A - mean)/sqrt(var + 1e-8)")

    # §8 the update steps: rows, ratios, losses
    eps, eps_v = cfg["clip_range"], cfg["clip_range_value"]
    A = tr["advantages"]
    steps = []
    for k, u in enumerate(tr["updates"]):
        rows = match_rows(u, tr)
        logr = {(i, t): u["logprobs"][j][t] - lp[i][t] for j, i in enumerate(rows) for t in range(T) if mask[i][t]}
        rho = {key: math.exp(x) for key, x in logr.items()}
        clip = {key: min(max(x, 1 - eps), 1 + eps) for key, x in rho.items()}
        pol = [max(-A[i][t] * rho[i, t], -A[i][t] * clip[i, t]) for i, t in rho]
        clipped = [(i, t) for i, t in rho if -A[i][t] * clip[i, t] > -A[i][t] * rho[i, t]]
        vl = []
        for j, i in enumerate(rows):
            for t in (t for t in range(T) if mask[i][t]):
                V, Vo, R = u["values"][j][t], tr["values"][i][t], tr["returns"][i][t]
                vl.append(max((V - R) ** 2, (Vo + min(max(V - Vo, -eps_v), eps_v) - R) ** 2))
        n = len(rho)
        check_logged({"policy/ratio": sum(rho.values()) / n, "policy/clipfrac": len(clipped) / n,
                      "policy/approx_kl": sum(math.expm1(x) - x for x in logr.values()) / n,
                      "loss/policy": sum(pol) / n, "loss/value": 0.5 * sum(vl) / n}, u, f"update {k + 1}")
        steps.append({"rows": rows, "rho": rho, "clipped": clipped, "max_abs_logr": max(map(abs, logr.values())),
                      "new_lp": {(i, t): u["logprobs"][j][t] for j, i in enumerate(rows) for t in range(T)
                                 if mask[i][t]}, "stats": u})
    d["steps"] = steps
    nmb, epochs = cfg["num_mini_batches"], cfg["ppo_epochs"]
    check(len(steps) == nmb * epochs, "one trace entry per optimizer step expected (no micro-batches)")
    d["step_labels"] = [f"epoch {k // nmb + 1}" + (f", minibatch {k % nmb + 1}" if nmb > 1 else "")
                        for k in range(len(steps))]
    # the LR of each step (the trace does not hold it): optim.lr_factor's linear schedule over all
    # optimizer steps of the run; the metrics line's lr, checked below, is the one after the last step
    total = cfg["num_iterations"] * epochs * nmb
    check(cfg["lr_schedule"] == "linear" and cfg["warmup_steps"] == 0, "the doc assumes a linear LR schedule")
    d["lr_steps"] = [cfg["learning_rate"] * max(0.0, (total - s) / max(1, total)) for s in range(len(steps) + 1)]

    # the moved tokens after the last step; a Δ printed as 0.0000 is float noise, its sign a CPU's choice
    last = steps[-1]
    delta = {key: last["new_lp"][key] - lp[key[0]][key[1]] for key in last["new_lp"]}
    d["delta"] = delta
    d["up"] = max(delta, key=delta.get)
    d["down"] = min(delta, key=delta.get)
    moved = [(i, t) for (i, t), x in delta.items() if abs(x) >= PRINTS_AS_ZERO]
    d["n_moved"] = len(moved)
    d["with_adv"] = sum(1 for i, t in moved if delta[i, t] * A[i][t] > 0)

    # §9 what the adaptive controller would do with this batch's KL
    seq_kl = sum(map(sum, tr["kl"])) / B
    e = min(max(seq_kl / cfg["kl_target"] - 1, -0.2), 0.2)
    d["adaptive"] = {"kl": seq_kl, "e": e, "beta": beta * (1 + e * cfg["batch_size"] / cfg["kl_horizon"])}

    # §10 the iteration's metrics line, re-derived
    tm = [m for m in read_jsonl(out_dir / "metrics.jsonl") if m.get("phase") == "ppo"]
    line = next(m for m in tm if m["step"] == 1)
    d["trace_metrics"], d["trace_eval_before"] = line, next(m for m in tm if m["step"] == 0)
    _, var_r = masked_moments(tr["returns"], mask)
    err = [[R - V for R, V in zip(rr, vv)] for rr, vv in zip(tr["returns"], tr["values"])]
    _, var_e = masked_moments(err, mask)
    check_logged({"objective/kl": seq_kl, "objective/scores": sum(tr["scores"]) / B,
                  "objective/rlhf_reward": sum(map(sum, tr["rewards"])) / B,
                  "val/explained_variance": 1 - var_e / var_r if var_r > 0 else 0.0,
                  "response/length": sum(d["resp_len"]) / B,
                  "loss/policy": sum(s["stats"]["loss/policy"] for s in steps) / len(steps),
                  "policy/clipfrac": sum(s["stats"]["policy/clipfrac"] for s in steps) / len(steps),
                  "lr": d["lr_steps"][-1]}, line, "OUTPUT/metrics.jsonl")

    # the demo's PPO iterations, from the committed metrics
    demo = [m for m in read_jsonl(data / "metrics.jsonl") if m.get("phase") == "ppo"]
    d["demo"] = demo
    keys = [k for k, *_ in HEALTH] + ["val/mean", "lr", "response/eos_fraction"]
    d["demo_stats"] = {k: demo_stats(demo, k) for k in keys}
    return d


# ----------------------------------------------------------------------------------------------
# The healthy-ranges section: the demo's metrics
# ----------------------------------------------------------------------------------------------

# (metric, what it is, healthy, warning sign). Static knowledge; the demo's numbers come from its metrics.jsonl.
HEALTH = [
    ("objective/scores", "mean reward-model score of the batch",
     "rises, then flattens", "rises while `eval/gold_reward` falls: the policy exploits the reward model"),
    ("objective/kl", "mean Σ_t kl_t per response to π_ref (the penalized estimate)",
     "starts at 0, grows, then levels off at a few nats",
     ("keeps growing (tens of nats): the policy leaves the data the reward model knows; "
      "clearly negative: k1 noise on too few samples, or a bug")),
    ("objective/rlhf_reward", "score − β·Σ kl per response: what PPO maximizes",
     "rises", "falls or stalls while the score rises: the KL cost eats the gain"),
    ("eval/gold_reward", "the task's true judge on held-out prompts",
     "rises with the score", "flat or falling while `objective/scores` rises (reward hacking)"),
    ("eval/kl_to_ref", "exact full-vocabulary KL on held-out prompts",
     "close to `objective/kl`", "far above `objective/kl`: the k1 estimate misses where the policy moved"),
    ("loss/policy", "clipped surrogate (token mean)",
     "near 0 (magnitude ≲ 0.05): Â is whitened, so it averages 0 at ρ = 1",
     "large in magnitude, trending, or NaN (a skipped step: `perf/skipped_steps`)"),
    ("loss/value", "½·(V − R)², clipped (token mean)",
     "falls as the critic learns the returns", "grows or oscillates: the critic cannot follow R"),
    ("val/explained_variance", "1 − Var[R − V]/Var[R]",
     "climbs toward 0.5 to 1", "≤ 0: V explains nothing of R; GAE then uses a poor baseline"),
    ("policy/approx_kl", "k3 of π_old vs π_θ during the update",
     "about 1e-3 to 1e-2 per step", "above ~0.02 to 0.05: steps too large (lower the LR, set `target_kl`)"),
    ("policy/clipfrac", "share of tokens whose ratio was clipped",
     "0 to 0.2", "above ~0.3: steps too large; 0 throughout: the policy barely moves"),
    ("policy/entropy", "mean per-token entropy of π_θ (nats)",
     "drifts down slowly", "collapses toward 0 (one repeated answer) or climbs (degenerate text)"),
    ("response/length", "mean valid tokens per response",
     "stable or moving with the task", "pinned at `response_length` (no EOS) or collapsing: length hacking"),
]


def series(demo: list[dict], key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in demo if key in m and (m["step"] > 0 or key.startswith("eval/"))]


def demo_stats(demo: list[dict], key: str) -> dict:
    s = series(demo, key)
    vals = [v for _, v in s]
    return {"first": vals[0], "last": vals[-1], "min": min(vals), "max": max(vals), "vals": vals,
            "steps": [k for k, _ in s]}


def plot(demo: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k, *_ in HEALTH]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(14, 8.5), sharex=True)
    for ax, key in zip(axes.flat, keys):
        s = series(demo, key)
        ax.plot([k for k, _ in s], [v for _, v in s], marker="o" if key.startswith("eval/") else None,
                markersize=3, linewidth=1)
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
        if key in ("loss/policy", "val/explained_variance", "objective/kl"):
            ax.axhline(0, color="gray", linewidth=0.8)
    for ax in axes[-1]:
        ax.set_xlabel("PPO iteration")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def health_findings(d: dict) -> list[str]:
    """What the demo's curves say, one sentence each, every judgement derived from the numbers."""
    demo, cfg = d["demo"], d["run_cfg"]["ppo"]
    st = d["demo_stats"]
    out = []
    sc, gold = st["objective/scores"], st["eval/gold_reward"]
    rises = gold["last"] > gold["first"]
    judge = "and the gold judge agrees" if rises else "but the gold judge does not"
    out.append(f"**The reward went up, {judge}.** `objective/scores` went from "
               f"{sig3(sc['first'])} to {sig3(sc['last'])}; on held-out prompts `eval/gold_reward` went "
               f"from {sig3(gold['first'])} (the SFT policy) to {sig3(gold['last'])}"
               + (", so the reward model's gains are real ones here, not reward hacking."
                  if rises else ": the policy is exploiting the reward model."))
    kl, ekl = st["objective/kl"], st["eval/kl_to_ref"]
    rr = st["objective/rlhf_reward"]
    check(close(sc["last"] - cfg["kl_coef"] * kl["last"], rr["last"], 1e-3) or cfg["adaptive_kl"],
          "objective/rlhf_reward != objective/scores - beta * objective/kl")
    kls = kl["vals"]
    q = max(1, len(kls) // 4)
    late, before = sum(kls[-q:]) / q, sum(kls[-2 * q:-q]) / q
    flat = abs(late - before) < 0.2 * max(abs(late), 1e-9)
    out.append(f"**The KL grew, then {'levelled off' if flat else 'kept moving'}.** `objective/kl` averaged "
               f"{sig3(before)} nats per response over iterations {len(kls) - 2 * q + 1} to {len(kls) - q} and "
               f"{sig3(late)} over the last {q} (peak {sig3(kl['max'])}, last {sig3(kl['last'])}); the exact `eval/kl_to_ref` "
               f"ended at {sig3(ekl['last'])}, {'close to' if abs(ekl['last'] - kl['last']) < 0.25 * max(kl['last'], 1e-9) else 'away from'} "
               f"the k1 estimate. With β = {g(cfg['kl_coef'])} the penalty costs about β·KL = "
               f"{sig3(cfg['kl_coef'] * kl['last'])}, which is the gap between `objective/scores` "
               f"({sig3(sc['last'])}) and `objective/rlhf_reward` ({sig3(st['objective/rlhf_reward']['last'])}) "
               "at the end.")
    ev, vm = st["val/explained_variance"], st["val/mean"]
    n_it = max(m["step"] for m in demo)
    if ev["max"] < 0.2:
        out.append(f"**The critic explains little in this demo.** `val/explained_variance` stayed between "
                   f"{sig3(ev['min'])} and {sig3(ev['max'])} (last {sig3(ev['last'])}): near or below 0 "
                   "throughout. `loss/value` did fall (from "
                   f"{sig3(st['loss/value']['first'])} to {sig3(st['loss/value']['last'])}) because V learned the "
                   f"*average* return (`val/mean` went from {sig3(vm['first'])} to {sig3(vm['last'])}, the level of "
                   "`objective/rlhf_reward`), but not which response will score well. With V ≈ a constant c, GAE gives "
                   "A_t ≈ λ^(L−t)·(score − c) plus the KL terms: a REINFORCE-like advantage with a batch-wide "
                   "baseline, which the whitening of §7 would supply anyway. Part of this is inherent: before the "
                   "words that decide the score are sampled, the prefix says little about it, so even a perfect V "
                   "could not explain the early tokens' returns. The rest is likely the setup: a tiny trunk "
                   f"(hidden size {d['run_cfg']['model']['hidden_size']}) shared with the policy, "
                   f"{g(cfg['vf_coef'])}·L_value in the loss, {n_it} iterations. It is the first curve to watch "
                   "in a larger run.")
    else:
        out.append(f"**The critic learns.** `val/explained_variance` went from {sig3(ev['first'])} to "
                   f"{sig3(ev['last'])} (max {sig3(ev['max'])}), while `val/mean` went from {sig3(vm['first'])} to "
                   f"{sig3(vm['last'])}. The demo's value model is not a head on the policy's trunk: the tiny "
                   "preset's pipeline gives it its own trunk, a copy of the reward model's "
                   f"(`value_model={cfg['value_model']!r}`, `value_init_from_reward={cfg['value_init_from_reward']}`; "
                   "presets/tiny.py). The policy's hidden states barely encode the score (a ridge or MLP head fitted "
                   "on them explains at most 0.08 of the returns), so a shared head could only learn the mean return "
                   "(explained variance −0.13 to 0 in this demo before); the reward model's trunk reads it. Early "
                   "tokens' returns stay partly unpredictable (the words that decide the score are not sampled "
                   "yet), which bounds what any critic can explain.")
    ak, cf, lr = st["policy/approx_kl"], st["policy/clipfrac"], st["lr"]
    small = ak["max"] < 0.02 and cf["max"] < 0.2
    peak = "its maximum" if ak["first"] == ak["max"] else f"max {sig3(ak['max'])}"
    ends = (f"both fall to {sig3(ak['last'])}" if sig3(ak["last"]) == sig3(cf["last"])
            else f"they fall to {sig3(ak['last'])} and {sig3(cf['last'])}")
    decays = lr["last"] < 0.05 * lr["max"]
    out.append(f"**The update steps were {'small' if small else 'large'}{', and shrank to nothing' if decays else ''}.** "
               f"`policy/approx_kl` was {sig3(ak['first'])} on iteration 1 ({peak}) and `policy/clipfrac` at most "
               f"{sig3(cf['max'])}, {'both well inside' if small else 'beyond'} the healthy range"
               + (f"; {ends} by the end because the LR decays to {sig3(lr['last'])} "
                  f"(`lr_schedule={cfg['lr_schedule']}`), not because the policy converged." if decays else "."))
    en, ln, eos = st["policy/entropy"], st["response/length"], st["response/eos_fraction"]
    collapse = en["min"] < 0.3 * en["first"] or eos["min"] < 0.5
    out.append(f"**{'Watch for collapse' if collapse else 'No collapse'}.** `policy/entropy` stayed between {sig3(en['min'])} and {sig3(en['max'])} nats "
               f"per token; `response/length` went from {sig3(ln['first'])} to {sig3(ln['last'])} tokens "
               f"(limit {cfg['response_length']}) and the share of responses ending in EOS "
               f"(`response/eos_fraction`) was never below {sig3(eos['min'])}.")
    return out


# ----------------------------------------------------------------------------------------------
# The document
# ----------------------------------------------------------------------------------------------

def render(d: dict) -> str:
    tr, cfg, run_cfg, vocab = d["tr"], d["cfg"], d["run_cfg"], d["vocab"]
    B, T, mask = d["B"], d["T"], tr["mask"]
    model = run_cfg["model"]
    beta, gamma, lam = tr["kl_coef"], cfg["gamma"], cfg["lam"]
    demo_cfg = run_cfg["ppo"]

    # --- §1
    pads = [d["Lq"] - n for n in d["qlen"]]
    if not any(pads):
        pad_note = f"# {all_of(B)} {d['Lq']} tokens: no {vocab.pad} (= {vocab.pad_id}) needed here"
        pad_prose = f"(this batch needs no pad: {all_of(B)} prompts are {d['Lq']} tokens)"
    else:
        pad_note = "# " + ", ".join(f"row {i}: {plural(p, 'pad')}" for i, p in enumerate(pads)) + \
            f" ({vocab.pad} = {vocab.pad_id})"
        pad_prose = "(" + ", ".join(f"row {i} gets {plural(p, 'pad')}" for i, p in enumerate(pads)) + ")"

    # --- §2
    texts = [json.dumps(t, ensure_ascii=False) for t in tr["responses"]]
    n_eos = sum(d["has_eos"])
    if n_eos == 0 and all(n == T for n in d["resp_len"]):
        mask_note = f"({all_of(B)} hit the {cfg['response_length']}-token limit: no EOS)"
    else:
        mask_note = "(" + "; ".join(
            f"row {i}: EOS at token {d['resp_len'][i] - 1}" if d["has_eos"][i]
            else f"row {i}: no EOS, truncated at {d['resp_len'][i]}" for i in range(B)) + ")"
    ids_rows = ("response_ids " + matrix(tr["response_ids"], 13, ints=True)).split("\n")
    width = max(len(r) for r in ids_rows) + 4
    resp_block = [row.ljust(width) + text for row, text in zip(ids_rows, texts)]
    mask_line = "mask         " + matrix(mask, 13, ints=True)
    tokens_line = " | ".join("·".join(json.dumps(x, ensure_ascii=False) for x in toks) for toks in d["tokens"][:1])

    # --- §3
    # Which tokens read ±1e-6 rather than 0 at the trace's 6 digits is rounding noise that differs per
    # CPU, so the doc states a bound (checked) rather than those values.
    noise = d["max_k1"] < FLOAT_NOISE
    noise_bound = g(FLOAT_NOISE)
    k1_text = (f"every |k1| is below {noise_bound}" if noise
               else f"|k1| reaches {p4(d['max_k1'])}: more than float rounding")
    ref_line = (f"ref_logprobs  the same up to float rounding, |Δ| < {noise_bound} (iteration 1: the policy "
                "still equals its reference)" if noise else "ref_logprobs  " + matrix(tr["ref_logprobs"], 14))

    values_note = (" They start near 0: the critic has learned nothing yet."
                   if all(abs(x) < 0.5 for r in tr["values"] for x in r) else "")

    # --- §4/5 rewards
    best = max(range(B), key=lambda i: tr["scores"][i])
    worst = min(range(B), key=lambda i: tr["scores"][i])
    paid = ", ".join(f"row {i} on token {last_valid(mask[i])}" for i in range(B))
    kl_line = "kl       " + matrix(tr["kl"], 9)
    kl_note = (f"The kl row reads 0 to 4 digits: on iteration 1 π_old = π_ref up to float rounding "
               f"(|k1| < {noise_bound}, §3), so the rewards are the scores alone. " if noise else "")

    # --- §6
    h = d["hand"]
    L = h["L"]
    gl = gamma * lam
    gamma_v = f"{g(gamma)}·{paren(h['V_L'])}" if gamma != 1 else paren(h["V_L"])

    # --- §7
    raw = [tr["raw_advantages"][i][t] for i, t in valid(mask)]
    signs = ("positive" if all(x > 0 for x in raw) else "negative" if all(x < 0 for x in raw) else None)
    scores_all_pos = all(s > 0 for s in tr["scores"])
    if signs:
        before = (f"Before whitening every advantage is {signs}"
                  + (f" ({all_of(B)} scores are)" if signs == "positive" and scores_all_pos else "") + "; ")
    else:
        before = "Before whitening the advantages have mixed signs; "

    def row_fate(i):
        ws = [tr["advantages"][i][t] for t in range(T) if mask[i][t]]
        return "up" if all(x > 0 for x in ws) else "down" if all(x < 0 for x in ws) else "both ways"
    fates = [row_fate(i) for i in range(B)]
    if B == 2 and fates[best] == "up" and fates[worst] == "down":
        after = (f"so row {best} (the better-scored review) is now pushed up,\nrow {worst} down: only how a "
                 "response compares with the rest of the batch counts.")
    else:
        after = "so each token's sign now says whether it did better than the batch: " + ", ".join(
            f"row {i} is pushed {f}" for i, f in enumerate(fates)) + "."

    # --- §8
    s1, sl = d["steps"][0], d["steps"][-1]
    first_rows = s1["rows"]
    order = (f"here row {first_rows[0]} came first" if len(first_rows) == B and B == 2
             else "here the order was rows " + ", ".join(map(str, first_rows)))
    step_keys = ["policy/ratio", "policy/clipfrac", "policy/approx_kl", "loss/policy", "loss/value", "policy/entropy"]
    table = md_table(["update step", "lr"] + [k + (" (k3)" if k == "policy/approx_kl" else "") for k in step_keys],
                     [[label, g(lr)] + [p4(s["stats"][k]) for k in step_keys]
                      for label, lr, s in zip(d["step_labels"], d["lr_steps"], d["steps"])])
    up, down = d["up"], d["down"]

    def tok(key):
        i, t = key
        return f"row {i}'s {ordinal(t)} token {json.dumps(d['tokens'][i][t].strip() or d['tokens'][i][t])}"
    old = tr["logprobs"]

    def adv2(key):
        return signed(tr["advantages"][key[0]][key[1]], lambda x: f"{x:.2f}".replace("-", MINUS))

    def moved_note(key):
        return ", where its row's score was paid" if key[1] == last_valid(mask[key[0]]) else ""
    rhos = list(sl["rho"].values())
    n_clip = len(sl["clipped"])
    clip_text = (f"no token of {d['n_tok']} had its ratio clipped" if n_clip == 0
                 else f"{plural(n_clip, 'token')} of {d['n_tok']} had {'its' if n_clip == 1 else 'their'} ratio clipped")
    rho1 = (f"|log ρ| < {noise_bound}: the same float noise as k1, §3" if s1["max_abs_logr"] < FLOAT_NOISE
            else f"|log ρ| ≤ {p4(s1['max_abs_logr'])}")
    loss0 = (", so its policy loss is −mean(Â) = 0 and only its gradient matters"
             if f4(s1["stats"]["loss/policy"]) == "0.0000" else "")
    lab_new = f"logprobs at step {len(d['steps'])}  "
    lab_delta = "Δ = new − old".ljust(len(lab_new))
    delta_rows = [[d["delta"].get((i, t), 0.0) for t in range(T)] for i in range(B)]
    new_rows = [[sl["new_lp"].get((i, t), 0.0) for t in range(T)] for i in range(B)]

    # --- §9
    ad = d["adaptive"]

    # --- §10
    tm = d["trace_metrics"]

    # --- healthy ranges
    demo = d["demo"]
    n_it = max(m["step"] for m in demo)
    stats = d["demo_stats"]
    health_table = md_table(
        ["metric", "what it is", "demo: first → last", "demo: min, max", "healthy", "warning sign"],
        [[f"`{key}`", what, f"{sig3(stats[key]['first'])} → {sig3(stats[key]['last'])}",
          f"{sig3(stats[key]['min'])}, {sig3(stats[key]['max'])}", good, bad] for key, what, good, bad in HEALTH])
    evals = stats["eval/gold_reward"]["steps"]
    findings = "\n".join(f"- {x}" for x in health_findings(d))

    # --- the sources
    cmd_demo = "\n  ".join(shell_command(DEMO_ARGS, run="RUN"))
    cmd_trace = "\n  ".join(shell_command(TRACE_ARGS, data=DATA_REL, out="OUTPUT"))
    mach, summary = d["machine"], d["summary"]
    # the optimizer steps whose rounding the demo's curves carry: pretrain, SFT, the reward model, PPO
    n_steps = (sum(summary[phase]["steps"] for phase in ("pretrain", "sft", "reward"))
               + demo_cfg["num_iterations"] * demo_cfg["ppo_epochs"] * demo_cfg["num_mini_batches"])

    return f"""<!-- Generated by docs/how_ppo_works.py from a real run; do not edit by hand (tests/docs/test_how_ppo_works.py
     re-renders it and fails when a number differs). Edit the template in the script instead. -->
# How PPO works here — one iteration on a {B}-prompt batch

This walks through **one PPO iteration** of this engine with the tensors it really computed. Every number
below is printed by `docs/how_ppo_works.py` from two runs:

- **The demo**, the tiny pipeline (pretrain → SFT → reward model → {demo_cfg['num_iterations']} PPO iterations) that
  `make demo` writes to `runs/demo`:

  ```
  {cmd_demo}
  ```

  Its SFT policy, reward model, `metrics.jsonl`, `summary.json` and `config.json` are committed in
  [`{DATA_REL}/`](data/demo/), made on `{mach['cpu']}` (torch {mach['torch']}, {mach['cpu_capability']} kernels).
  On another CPU the demo's curves come out a little different (float rounding through its {n_steps} optimizer
  steps); the trace below is reproducible from the committed weights.

- **`OUTPUT`**, one traced PPO iteration of the demo's SFT policy ({model['num_layers']}-layer Llama-style model,
  hidden {model['hidden_size']}, {model['vocab_size']}-token BPE) against its reward model, on a batch of {B}:

  ```
  {cmd_trace}
  ```

  `PPOConfig(trace=True)` makes `PPOTrainer` keep every tensor of iteration 1, and
  `rlhf_core/phases/ppo.py:run` writes them to `OUTPUT/ppo/trace.json` (rounded to 6 digits).

`python docs/how_ppo_works.py --check` runs the trace on the committed weights and renders this page;
`--regenerate` first reruns the demo and replaces `{DATA_REL}/` and the figure.
Tensors are rounded here to 4 digits. The loop is `rlhf_core/ppo/trainer.py:PPOTrainer.step`; its numbered
comments `# 1.` … `# 10.` are the sections §1 … §10 below. A location `module:name` is a function or class of
`rlhf_core/ppo/module.py`, except `optim:` (`rlhf_core/optim.py`); `kernels.` is the top-level `kernels` package.

## The setting: RLHF as a Markov decision process

PPO is a reinforcement-learning algorithm, so first the RL vocabulary in language-model terms:

- **State** s_t: the prompt plus the response tokens generated so far, a_0 … a_(t−1).
- **Action** a_t: the next token, one of the {model['vocab_size']} vocabulary entries; the **policy**
  π_θ(a_t | s_t) is the language model's next-token distribution.
- **Episode**: one response, from the prompt to its EOS (or to `response_length` tokens, where it is cut off).
- **Reward**: the reward model judges the *whole* response once, so its score arrives only at the last
  token. On every token the policy also pays a KL penalty −β·kl_t for moving away from the reference model
  (§5). So r_t = −β·kl_t, plus the score on the last token.
- **Return**: what PPO maximizes, the sum of an episode's rewards. The discount γ weighs a reward k tokens
  later by γ^k; here γ = {g(gamma)}{', so the return is the plain sum: score − β·Σ_t kl_t' if gamma == 1 else ''}.
  GAE's λ = {g(lam)} (§6) trades bias for variance when crediting a token with the rewards that follow it.

The state transition is deterministic (append the token), and an iteration collects {B} episodes
(`batch_size`), then improves the policy on them.

## One iteration at a glance

```
 prompts (B strings)
   │ §1 encode_prompts: tokenize, left-pad
   ▼
 query_ids, query_mask (B, Lq)
   │ §2 generate: sample from π_θ with a KV cache, no grad (π_old := π_θ now)
   ▼
 response_ids, mask (B, T)  +  the hidden states h (B, T, H) they were sampled from
   │ §3 score: h → logprobs (π_old) and values V_old;  π_ref forward → ref_logprobs
   │ §4 reward model on the decoded text → scores (B,)
   ▼
 §5 kl_t = logprobs − ref_logprobs (k1);  rewards r_t = −β·kl_t + score·[t = last]       (B, T)
   │
   ▼
 §6 GAE(r, V_old; γ, λ) → raw advantages A, returns R = A + V_old                          (B, T)
   │ §7 whiten A over the batch's valid tokens → Â
   ▼
 §8 for each of ppo_epochs epochs, for each shuffled minibatch:
      forward π_θ with grad → logprobs, V, entropy;   ρ = exp(logprobs − logprobs_old)
      loss = L_policy(ρ, Â) + vf_coef·L_value(V, V_old, R) − ent_coef·entropy → AdamW step
   │
   ▼
 §9 KL controller: β for the next iteration (fixed by default)
 §10 metrics: one line per iteration in RUN/metrics.jsonl
```

## Glossary

The tensors are the fields of one batch of rollouts, [`Experience`](../rlhf_core/ppo/experience.py)
(shapes and meanings in its docstring).

- **trunk**: the transformer without its LM head (`model.model`): token ids → hidden states h (B, L, H).
  The LM head is a matrix W (V, H); logits are h·Wᵀ. Only the trunk ever runs forward here (§3).
- **π_θ**: the policy being trained, with its current weights θ.
- **π_old**: the same policy frozen at rollout time, the one that sampled the batch; its log-probabilities
  are [`Experience.logprobs`](../rlhf_core/ppo/experience.py). During the update π_θ moves away from it.
- **π_ref**: the reference policy (the SFT model, never trained); its log-probabilities are
  [`Experience.ref_logprobs`](../rlhf_core/ppo/experience.py). The KL penalty keeps π_θ near it.
- **V** (critic, value head): V(s_t) estimates the return still to come from state s_t;
  [`Experience.values`](../rlhf_core/ppo/experience.py) holds V_old, its estimate at rollout time.
- **R** (returns): the value head's regression targets R_t = A_t + V_old(s_t),
  [`Experience.returns`](../rlhf_core/ppo/experience.py).
- **Â** (advantages): how much better token a_t did than V expected, GAE then whitened,
  [`Experience.advantages`](../rlhf_core/ppo/experience.py).
- **ρ** (ratio): ρ_t = π_θ(a_t|s_t) / π_old(a_t|s_t) = exp(logprobs_t − old logprobs_t), 1 at the first step.
- **Three kinds of KL are logged; they are different quantities:**
  - `policy/approx_kl`: k3 = (ρ − 1) − log ρ averaged over the minibatch's tokens, between π_old and π_θ
    *during the update*. A trust-region diagnostic: how far one optimizer step moved the policy (§8).
  - `objective/kl`: the batch mean of Σ_t kl_t, the per-token KL estimate to π_ref that the penalty
    uses ([`Experience.kl`](../rlhf_core/ppo/experience.py), §5, §9); next to it `objective/kl_exact`
    ([`Experience.kl_exact`](../rlhf_core/ppo/experience.py), §3), `objective/kl_k1` and `objective/kl_k3`:
    the same rollout's KL measured exactly and by the two estimators.
  - `eval/kl_to_ref`: the exact full-vocabulary KL(π_θ‖π_ref), summed over each response's tokens and
    averaged over held-out prompts (`rollout:evaluate`, §10), after the update.

## 1. Prompts → left-padded queries — `rollout:encode_prompts`

```
prompts    {json.dumps(tr['prompts'], ensure_ascii=False)}
query_ids  {matrix(tr['query_ids'], 11, ints=True)}     {pad_note}
query_mask {matrix(tr['query_mask'], 11, ints=True)}
```

Left padding puts every prompt's last token in the same column, so one forward gives every row's
first next-token distribution {pad_prose}.
Positions skip the pads: `position_ids = cumsum(mask) − 1`, clamped at 0 on the pads
(`policy:position_ids_for`), so a padded row computes exactly what it computes alone (tested to 1e-5
in `tests/ppo/test_policy.py`). Prompts longer than `max_prompt_length` ({cfg['max_prompt_length']}) keep their last tokens.

## 2. Generate — `rollout:generate`

One trunk forward over the queries fills the KV cache (`transformers.DynamicCache`); then per step
only the last position's logits `h_L · Wᵀ` (B, V) are formed and sampled
(`rollout:sample_next`: divided by the temperature, then an inverse-CDF draw from a seeded
`torch.Generator`). The draw is from the full softmax: every logprob, ratio and KL below is computed under
it, so `ppo.top_k` / `ppo.top_p`, which would sample from a truncated one, are refused. A row stops at its
EOS; later positions are `{vocab.pad}` and masked out. A row
without EOS is truncated at `response_length` ({cfg['response_length']}) and its mask covers every token.
The loop also keeps, for each token, the hidden state it was sampled from (§3).

```
{chr(10).join(resp_block)}
{mask_line}   {mask_note}
```

Row 0 token by token: {tokens_line}.

## 3. Logprobs and values — `rollout:score` → `kernels.fused_logprobs_kl`

The trunk returns hidden states `h` (B, L, H); response token t is predicted by position `Lq − 1 + t`.
Those (B·T, H) rows of the policy and of the reference go to one fused pass over the vocabulary:

    logprob_t     = z_t[a_t] − logsumexp(z_t),     z_t = h_t · Wᵀ / temperature          (temperature = {g(cfg['temperature'])})
    ref_logprob_t = zq_t[a_t] − logsumexp(zq_t),   zq_t from π_ref's h and W the same way
    kl_exact_t    = Σ_v softmax(z_t)_v (z_t,v − zq_t,v) − logsumexp(z_t) + logsumexp(zq_t)

computed chunk by chunk (torch reference on CPU, Triton on CUDA), so no (B, T, V) tensor exists, and
the exact KL of every state comes with the two logprobs at no extra sweep (the `objective/kl_exact` metric).
For the policy, `h` are the states the KV-cache sampling loop already computed
(`generate(..., return_hidden=True)` → `score(..., hidden=...)`, `PPOConfig.rollout_logprobs`), so
π_old needs no second forward; the reference and every PPO update step run the trunk.
Masked positions get `ignore_index` and read 0. The reference π_ref runs the same code inside
`PolicyWithValue.reference()`: the adapter-disabled policy under LoRA (no second copy), else a
frozen copy.

```
logprobs      {matrix(tr['logprobs'], 14)}
{ref_line}
values        {matrix(tr['values'], 14)}
```

`values` come from `ValueHead` (one linear layer, weights initialized with std 0.01, bias 0) on the *same*
hidden states (`value_model="{cfg['value_model']}"`), so one pass gives both. V_t = V(s_t), the value of the
state *before* token t.{values_note}

`logprobs` and `ref_logprobs` agree only to float rounding: the old logprobs come from the sampling
loop's KV-cache states, the reference's from a full trunk forward (another matmul shape). Per token,
k1 = logprobs − ref_logprobs: {k1_text}.

## 4. Scores — `reward_sources:checked_reward`, `experience_maker:make_experience`

The responses are decoded to text and the reward model reads `prompt + response + EOS` in its own
tokenizer (`reward_sources:reward_scores`), one scalar per response. `checked_reward` turns an exception,
a NaN/inf or a wrong count into a `RewardError` before any weight changes. `missing_eos_penalty`
({g(cfg['missing_eos_penalty'])} here) would be subtracted from the score of each row without EOS.

```
scores  {vector(tr['scores'])}
```

The reward model prefers row {best} ({texts[best]}) to row {worst} ({texts[worst]}).

## 5. Per-token rewards: the KL penalty — `rewards:approx_kl`, `rewards:kl_penalized_rewards`

With log r = ref_logprobs − logprobs (Schulman, "Approximating KL divergence"), three estimators of
KL(π_old‖π_ref) from the sampled tokens:

    k1 = −log r      k2 = ½ (log r)²      k3 = (r − 1) − log r          (kl_estimator = "{cfg['kl_estimator']}")

or, with `kl_estimator="exact"`, §3's `kl_exact`. Where the penalty goes is `kl_penalty`
(= "{cfg['kl_penalty']}" here): in the rewards, in the loss (a differentiated term, §8), or, for the exact KL,
both — [docs/kl.md](kl.md) shows which pairs train E[score] − β·KL(π‖π_ref) without bias (k1 in the
reward does; k3 estimates the KL's value without bias but as a reward trains another objective).
With the penalty in the rewards, the reward is −β·kl on each valid token, plus the score on the
**last valid token** (the EOS, or the truncation point — not the pad after it):

    r_t = −β · kl_t + score · [t = last valid t]          β = kl_coef = {g(beta)}

```
{kl_line}
rewards  {matrix(tr['rewards'], 9)}
```

{kl_note}Each score sits on its row's last valid token: {paid}.

With `whiten_rewards=True` ({str(cfg['whiten_rewards']).lower()} here) the rewards would next go through
`advantages:masked_whiten` with `shift_mean=False`: r̂ = (r − μ)/σ + μ over the valid tokens. That keeps the
mean but is not a pure rescaling: each valid token gains the same μ·(1 − 1/σ), a per-token bonus or penalty.

## 6. Advantages — `advantages:compute_gae` (via `advantages:get_advantage_estimator`)

The estimator is looked up by name (`advantage_estimator = "{cfg['advantage_estimator']}"`). GAE, from the last
token backwards, with m_t the mask:

    δ_t = r_t + γ · V_{{t+1}} · m_{{t+1}} − V_t          (V after the last valid token = 0)
    A_t = δ_t + γλ · m_{{t+1}} · A_{{t+1}}                returns R_t = A_t + V_t

with γ = {g(gamma)}, λ = {g(lam)}. Row 0 by hand: δ_{L} = r_{L} − V_{L} = {p4(h['r_L'])} − {paren(h['V_L'])} = {p4(h['d_L'])} = A_{L};
δ_{L - 1} = r_{L - 1} + γ·V_{L} − V_{L - 1} = {p4(h['r_p'])} + {gamma_v} − {paren(h['V_p'])} = {p4(h['d_p'])},
A_{L - 1} = δ_{L - 1} + γλ · A_{L} = {p4(h['d_p'])} + {g(gl)} · {p4(h['A_L'])} = {p4(h['A_p'])} (from the unrounded tensors).

```
raw advantages {matrix(tr['raw_advantages'], 15)}
returns        {matrix(tr['returns'], 15)}
```

Other estimators are one decorator away (`register_advantage_estimator`, see
`examples/custom_advantage.py`); `"rloo"` ships with the core.

## 7. Whitening the advantages — `advantages:masked_whiten`

    Â = (A − mean) / sqrt(var + 1e-8)     over the valid tokens of the whole batch (population variance)

```
advantages {matrix(tr['advantages'], 11)}
```

{before}whitening subtracts the batch mean {p4(d['w_mean'])}
and divides by the std {p4(d['w_std'])}, {after}

## 8. The update — `trainer:PPOTrainer.update` / `minibatch_step`, `losses:policy_loss`, `losses:value_loss`

The update reuses the rollout's tensors unchanged: the old logprobs (π_old) and V_old are the `logprobs` and
`values` of §3, R is the `returns` of §6 and Â the `advantages` of §7. `RolloutBuffer.minibatches` shuffles
the rows ({order}); for each of the `ppo_epochs` ({cfg['ppo_epochs']}) passes over the `num_mini_batches`
({cfg['num_mini_batches']}) minibatches, the policy recomputes logprobs, values and entropy with grad
(`response_logprobs`, same kernel), then

    ρ_t = exp(logprobs_t − old_logprobs_t)
    L_policy = masked_mean( max(−Â_t ρ_t, −Â_t clip(ρ_t, 1−ε, 1+ε)) )                       ε = {g(cfg['clip_range'])}
    L_value  = ½ masked_mean( max((V − R)², (clip(V, V_old − ε_v, V_old + ε_v) − R)²) )      ε_v = {g(cfg['clip_range_value'])}
    loss     = L_policy + vf_coef · L_value − ent_coef · entropy                             ({g(cfg['vf_coef'])}, {g(cfg['ent_coef'])})

(`objective:loss_terms` builds these per-token terms, the policy one the registered `ppo.policy_loss`,
`losses:ppo_clip_loss` by default — [docs/losses.md](losses.md) has the others; `objective:micro_batch_loss`
runs the forward and, when `kl_penalty` is "loss" or "both", adds β_b·kl_t with kl_t under the current
parameters and β_b the row's weight, here β/σ_Â — [docs/kl.md](kl.md).) The max makes both losses
pessimistic: once ρ leaves [1−ε, 1+ε] in the direction Â favours, that token's gradient is 0. With
micro-batches, each one's terms are divided by the whole minibatch's valid tokens (`objective:Denominators`),
so the micro losses add up to the un-accumulated one (tested to 1e-6). A non-finite loss or gradient skips the step
(`perf/skipped_steps`). The gradient norm is clipped to `max_grad_norm` ({g(cfg['max_grad_norm'])}); AdamW steps;
the LR follows `optim:lr_factor`: `{cfg['lr_schedule']}` decay from {g(cfg['learning_rate'])} to 0 over all
{cfg['num_iterations'] * cfg['ppo_epochs'] * cfg['num_mini_batches']} optimizer steps of this run.

{table}

The first step sees ρ = 1 up to float rounding ({rho1}){loss0};
the second sees the policy moved by the first:

```
{lab_new}{matrix(new_rows, len(lab_new))}
{lab_delta}{matrix(delta_rows, len(lab_new))}
```

The token that gained most is {tok(up)}{moved_note(up)}: {p4(old[up[0]][up[1]])} → {p4(sl['new_lp'][up])}
(its advantage Â = {adv2(up)}); the one that lost most is {tok(down)}{moved_note(down)}: {p4(old[down[0]][down[1]])} →
{p4(sl['new_lp'][down])} (Â = {adv2(down)}). Of the {d['n_moved']} tokens whose Δ is not 0 at 4 digits, {d['with_adv']} moved
in the direction of their advantage: every weight serves every token, so one step cannot move each token exactly
as its own Â asks.
{clip_text[0].upper() + clip_text[1:]} (ρ stayed in [{p4(min(rhos))}, {p4(max(rhos))}]).

## 9. KL controller — `rewards:FixedKLController` / `rewards:AdaptiveKLController`

With `adaptive_kl=True` ({str(cfg['adaptive_kl']).lower()} here; Ziegler et al. 2019):

    e = clip(KL_seq / kl_target − 1, −0.2, 0.2);     β ← β · (1 + e · batch_size / kl_horizon)

where KL_seq is the batch's mean summed KL that the penalty uses (`objective/kl`: the `kl_estimator`'s,
wherever `kl_penalty` puts it). Fixed by default. For this batch
KL_seq = {p4(ad['kl'])}, so with kl_target = {g(cfg['kl_target'])} and kl_horizon = {g(cfg['kl_horizon'])} the adaptive
controller would compute e = {p4(ad['e'])} and β ← {ad['beta']:.6f}: at most a 20 % change per kl_horizon
episodes, so it steers slowly, over thousands of responses.

## 10. Metrics

Logged once per iteration to `RUN/metrics.jsonl` (`log_every`), update statistics being means over the
optimizer steps that ran: `loss/policy`, `loss/value`, `policy/approx_kl`, `policy/clipfrac`,
`policy/ratio`, `policy/entropy`, `policy/grad_norm`, `val/explained_variance` (1 − Var[R − V]/Var[R]),
`val/error`, `val/clipfrac`, `val/mean`, `objective/kl` (the penalty's), `objective/kl_exact`,
`objective/kl_k1` and `objective/kl_k3` (the same rollout's KL three ways: how far an estimator is from
the truth), `objective/scores`, `objective/rlhf_reward` (mean of score − β·Σ_t kl_t, before any reward
whitening), `objective/kl_coef`, `loss/kl` (with the penalty in the loss), `response/length`,
`response/eos_fraction`, `lr`, `perf/episodes_per_s`, `perf/tokens_per_s`, `perf/skipped_steps`,
`time/generate`, `time/score`, `time/rollout`, `time/update`; before training and every `eval_every`
iterations (and at the end) `eval/gold_reward`, `eval/scores`, `eval/kl_to_ref` and `eval/response_length`
on {run_cfg['task']['n_eval_prompts']} held-out prompts, responses sampled at the training temperature with a fixed
seed (`rollout:evaluate`).

This iteration's line, each value re-derived from the tensors above:

| metric | logged | from |
|---|---|---|
| `objective/kl` | {p4(tm['objective/kl'])} | mean over rows of Σ_t kl_t (§5) |
| `objective/scores` | {p4(tm['objective/scores'])} | mean of `scores` (§4) |
| `objective/rlhf_reward` | {p4(tm['objective/rlhf_reward'])} | mean over rows of Σ_t r_t (§5) |
| `val/explained_variance` | {p4(tm['val/explained_variance'])} | 1 − Var[R − V_old]/Var[R] over the {d['n_tok']} tokens (§3, §6) |
| `loss/policy` | {p4(tm['loss/policy'])} | mean of the {len(d['steps'])} steps' `loss/policy` (§8) |
| `response/length` | {p4(tm['response/length'])} | mean of the mask's row sums (§2) |

The same line holds the evaluation of the policy after its {len(d['steps'])} steps, on the held-out prompts:
`eval/kl_to_ref` = {p4(tm['eval/kl_to_ref'])} nats per response (before: {p4(d['trace_eval_before']['eval/kl_to_ref'])}),
`eval/gold_reward` {p4(d['trace_eval_before']['eval/gold_reward'])} → {p4(tm['eval/gold_reward'])}.

## Healthy ranges: what the demo's {n_it} iterations show

How to read a PPO run's metrics, with the demo's (`{DATA_REL}/metrics.jsonl`, phase `ppo`: {demo_cfg['batch_size']}
responses per iteration, {demo_cfg['ppo_epochs']} epochs × {demo_cfg['num_mini_batches']} minibatches, β = {g(demo_cfg['kl_coef'])})
over its {n_it} iterations; the `eval/` metrics at iterations {', '.join(map(str, evals))} (iteration 0: the SFT policy,
before PPO).
A value below 5e-5 in magnitude reads 0.

![The demo's PPO metrics]({IMG_NAME})

{health_table}

What the demo shows:

{findings}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true",
                      help="run the trace command on --data's models (into a temporary folder) and render (~15 s)")
    mode.add_argument("--regenerate", nargs="?", const="", metavar="RUN",
                      help=("first run the demo into RUN (default: a temporary folder), replace --data with its "
                            f"outputs and redraw docs/{IMG_NAME}; then as --check (~2 min)"))
    mode.add_argument("--trace", type=Path, help="render from this OUTPUT/ppo/trace.json, running nothing")
    ap.add_argument("--data", type=Path, default=DATA, help="the demo's committed outputs (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown to write (default: %(default)s)")
    ap.add_argument("--img", type=Path, help="draw the figure here too (--regenerate draws it in docs/img)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="how_ppo_works-") as tmp:
        img = args.img
        if args.regenerate is not None:
            run = Path(args.regenerate or Path(tmp) / "demo").resolve()
            rlhf(DEMO_ARGS, run=run)
            save_demo_data(run, args.data)
            img = img or DEFAULT_OUT.parent / IMG_NAME
        d = analyse(args.data, args.trace or run_trace(args.data, Path(tmp) / "trace"))
    if img:
        plot(d["demo"], img, f"PPO metrics of the demo (rlhf pipeline --preset tiny), {len(d['demo']) - 1} iterations")
        print(f"wrote {img}")
    args.out.write_text(render(d))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
