"""Safe loading: no pickle, no torch.load without weights_only=True, no remote code, no torch.save.

The check reads the code itself (the AST and NAME tokens), so docstrings that *mention* pickle
are fine and a pickle import hidden in any module of the package is not.
"""
import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [ROOT / "rlhf_core", ROOT / "kernels"]
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def problems(source: str, name: str = "<src>") -> list[str]:
    """Every unsafe construct in ``source``, as 'name:line: what'."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string in UNSAFE_MODULES:
            found.append(f"{name}:{tok.start[0]}: uses {tok.string}")
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        keywords = {k.arg: k.value for k in node.keywords}
        if called == "load" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch" \
                and not is_true(keywords.get("weights_only", ast.Constant(False))):
            found.append(f"{name}:{node.lineno}: torch.load without weights_only=True")
        if called == "save" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch":
            found.append(f"{name}:{node.lineno}: torch.save (pickle); use safetensors")
        if "trust_remote_code" in keywords and not isinstance(keywords["trust_remote_code"], ast.Constant) \
                or is_true(keywords.get("trust_remote_code", ast.Constant(False))):
            found.append(f"{name}:{node.lineno}: trust_remote_code not literally False")
    return found


@pytest.mark.parametrize("snippet, what", [
    ("import pickle\n", "uses pickle"),
    ("from joblib import load\n", "uses joblib"),
    ("import torch\ntorch.load('x')\n", "torch.load without weights_only"),
    ("import torch\ntorch.load('x', weights_only=False)\n", "torch.load without weights_only"),
    ("import torch\ntorch.save({}, 'x')\n", "torch.save"),
    ("f(trust_remote_code=True)\n", "trust_remote_code"),
    ("f(trust_remote_code=flag)\n", "trust_remote_code"),
])
def test_checker_catches_unsafe_code(snippet, what):
    assert any(what in p for p in problems(snippet))


def test_checker_allows_safe_code():
    ok = ("'''pickle is never used'''\nimport torch\ntorch.load('x', weights_only=True)\n"
          "f(trust_remote_code=False)  # no pickle here\n")
    assert problems(ok) == []


def test_package_has_no_unsafe_loading():
    files = [f for pkg in PACKAGES for f in sorted(pkg.rglob("*.py"))]
    assert len(files) > 20
    found = [p for f in files for p in problems(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == []
