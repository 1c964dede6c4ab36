"""docs/how_ppo_works.md is generated: re-rendering it from the committed data must print the same document.

The doc reads the demo's outputs committed in docs/data/demo/ (SFT policy, reward model, metrics) and one
traced PPO iteration of that policy. The slow test reruns only that iteration (`how_ppo_works.py --check`,
a subprocess, ~15 s on CPU), renders, and compares with the committed file: the same text once every
number is masked out, the same count of numbers, and each number equal at the precision it is printed
with, up to one unit in its last digit (one iteration from fixed weights: another CPU rounds floats its
own way, ~1e-6 relative, which can flip a last digit). The healthy-ranges section is read from the
committed metrics.jsonl alone, so its numbers must match exactly. When the doc's template or the
engine's numbers changed on purpose, re-render (`--regenerate` also reruns the demo, ~2 min, and
replaces docs/data/demo/ and the figure):

    python docs/how_ppo_works.py --check          # or --regenerate
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "how_ppo_works.md"
SCRIPT = REPO / "docs" / "how_ppo_works.py"

# A number as the doc prints it: optional sign (ASCII or U+2212), digits, decimals, exponent. Digits
# inside identifiers (k1, δ_7, bf16) are text: the number must not follow a word character or a dot.
NUMBER = re.compile(r"(?<![\w.])[-−+]?\d+(?:\.\d+)?(?:e[-+−]?\d+)?(?!\w)")
HEALTHY = "\n## Healthy ranges"  # to the next heading: from docs/data/demo/metrics.jsonl only, exact


def value(s: str) -> float:
    return float(s.replace("−", "-"))


def unit(s: str) -> float:
    """One unit in the last printed digit: 0.5031 -> 1e-4, 5e-5 -> 1e-5, 16 -> 1."""
    mant, _, exp = s.replace("−", "-").partition("e")
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    return 10.0 ** (int(exp or 0) - decimals)


def section(text: str, heading: str) -> tuple[int, int]:
    """Where the section starting at ``heading`` is, up to the next ``## `` heading; (-1, -1) if absent."""
    start = text.find(heading)
    if start < 0:
        return -1, -1
    nxt = text.find("\n## ", start + 1)
    return start, len(text) if nxt < 0 else nxt


def context(text: str, start: int, end: int) -> str:
    line = text.count("\n", 0, start) + 1
    left = text.rfind("\n", 0, start) + 1
    right = text.find("\n", end)
    snippet = text[max(left, start - 70):(right if right >= 0 else len(text))][:160]
    return f"line {line}: {snippet!r}"


def compare(committed: str, fresh: str) -> None:
    """Raise AssertionError naming the first difference between the committed and the fresh doc."""
    masked_c, masked_f = NUMBER.sub("#", committed), NUMBER.sub("#", fresh)
    if masked_c != masked_f:
        lines_c, lines_f = masked_c.splitlines(), masked_f.splitlines()
        for i, (a, b) in enumerate(zip(lines_c, lines_f)):
            if a != b:
                raise AssertionError(f"the text differs (numbers masked as #) at line {i + 1}:\n"
                                     f"  committed: {a!r}\n  fresh:     {b!r}")
        raise AssertionError(f"the text differs in length: {len(lines_c)} lines committed, {len(lines_f)} fresh")
    nums_c, nums_f = list(NUMBER.finditer(committed)), list(NUMBER.finditer(fresh))
    assert len(nums_c) == len(nums_f), f"{len(nums_c)} numbers committed, {len(nums_f)} fresh"
    healthy = section(committed, HEALTHY)
    for k, (mc, mf) in enumerate(zip(nums_c, nums_f)):
        exact = healthy[0] <= mc.start() < healthy[1]
        tol = 0.0 if exact else max(unit(mc.group()), unit(mf.group()))
        if abs(value(mc.group()) - value(mf.group())) > tol * (1 + 1e-9):
            raise AssertionError(
                f"number {k + 1} of {len(nums_c)} differs: committed {mc.group()}, fresh {mf.group()} "
                f"({'exact in the healthy-ranges section' if exact else f'allowed: ±{tol:.3g}'})\n"
                f"  committed {context(committed, mc.start(), mc.end())}\n"
                f"  fresh     {context(fresh, mf.start(), mf.end())}\n"
                "If the numbers changed on purpose, re-render: python docs/how_ppo_works.py --check "
                "(or --regenerate)")


def test_doc_matches_a_fresh_trace(tmp_path):
    """Trace the committed weights again, render, compare with the committed doc (~15 s on CPU)."""
    out = tmp_path / "how_ppo_works.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check", "--out", str(out)],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"docs/how_ppo_works.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    compare(DOC.read_text(), out.read_text())


def edit_number(text: str, start: int, delta_units: float) -> tuple[str, str]:
    """The first decimal number after ``text[start]`` moved by ``delta_units`` units of its last digit."""
    m = next(m for m in NUMBER.finditer(text, start) if "." in m.group())
    s = m.group()
    decimals = len(s.split(".")[1])
    new = f"{value(s) + delta_units * unit(s):.{decimals}f}".replace("-", "−" if "−" in s else "-")
    return text[:m.start()] + new + text[m.end():], new


def test_compare_catches_edits():
    """The comparison itself (no run): the committed doc against edited copies of it."""
    doc = DOC.read_text()
    compare(doc, doc)
    gae = doc.index("## 6. ")
    edited, new = edit_number(doc, gae, 1)  # one unit: another CPU's rounding
    compare(doc, edited)
    edited, new = edit_number(doc, gae, 3)
    with pytest.raises(AssertionError, match=re.escape(new)):
        compare(doc, edited)
    row = doc.index("| `objective/scores`", doc.index(HEALTHY))  # the demo's first/last scores
    edited, new = edit_number(doc, row, 1)  # committed data: even one unit is a difference
    with pytest.raises(AssertionError, match="healthy-ranges"):
        compare(doc, edited)
    with pytest.raises(AssertionError, match="text differs"):
        compare(doc, doc.replace("Left padding puts", "Left padding put", 1))
