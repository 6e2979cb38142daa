"""No import cycle anywhere: every module of the project imports FIRST, in an interpreter where no other
project module is loaded yet.

A cycle hides as long as callers happen to import modules in a lucky order (``import tuning_core.search``
failed with "partially initialized module" while everyone imported ``tuning_core.config`` first). So each
module gets its own fresh start: one child interpreter imports the third-party packages the project uses
(what makes a start slow; they cannot hide a cycle among our modules), then forks once per project module,
and each fork imports just that module: the cost of one interpreter start, not one per module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tuning_core", "infra", "tasks", "flows")
# Extras a module may need that an install may lack: such a module is skipped, not failed.
OPTIONAL = {"torch", "torchvision"}


def project_modules() -> list[str]:
    mods = []
    for package in PACKAGES:
        for f in sorted((ROOT / package).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return mods


def third_party_imports() -> list[str]:
    names: set[str] = set()
    for package in PACKAGES:
        for f in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
                if isinstance(node, ast.Import):
                    names.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module)
    return sorted(n for n in names if n.split(".")[0] not in PACKAGES)


# Runs in the child: pre-import third-party packages, then one fork per project module.
_CHILD = r"""
import importlib, json, os, sys
mods, third, optional = json.loads(sys.argv[1])
for name in third:
    try:
        importlib.import_module(name)
    except Exception:
        pass  # an optional or platform-specific package: the module needing it will say so
assert not [m for m in sys.modules if m.split(".")[0] in {"tuning_core", "infra", "tasks", "flows"}]
results = {}
for mod in mods:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(mod)
            out = "ok"
        except BaseException as err:
            out = f"{type(err).__name__}: {err}"
            # A missing optional extra, raised as is or turned into our own one-line error: skipped.
            cause = err
            while cause is not None:
                if isinstance(cause, ModuleNotFoundError) and (cause.name or "").split(".")[0] in optional:
                    out = f"skip: needs {cause.name}"
                    break
                cause = cause.__cause__ or cause.__context__
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    results[mod] = b"".join(chunks).decode() or "child died without a word"
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def import_results() -> dict[str, str]:
    mods = project_modules()
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([mods, third_party_imports(), sorted(OPTIONAL)])],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")), None)
    assert line, f"the import child failed (rc={proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(line.removeprefix("RESULTS"))


def test_every_module_imports_first_in_a_fresh_interpreter(import_results):
    assert set(import_results) == set(project_modules())
    failed = {m: r for m, r in import_results.items() if r != "ok" and not r.startswith("skip:")}
    assert failed == {}


def test_a_missing_optional_extra_is_skipped_even_behind_our_own_error(tmp_path):
    """Without torch, tuning_core.trainables.torch raises a ConfigError from the ModuleNotFoundError."""
    pkg = tmp_path / "tuning_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "needs_extra.py").write_text(
        "try:\n    import no_such_extra_xyz\nexcept ModuleNotFoundError:\n"
        "    raise RuntimeError('install the extra') from None\n")
    (pkg / "broken.py").write_text("import no_such_package_xyz\n")
    proc = subprocess.run([sys.executable, "-c", _CHILD,
                           json.dumps([["tuning_core.needs_extra", "tuning_core.broken"], [], ["no_such_extra_xyz"]])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS"))
    results = json.loads(line.removeprefix("RESULTS"))
    assert results["tuning_core.needs_extra"] == "skip: needs no_such_extra_xyz"
    assert results["tuning_core.broken"].startswith("ModuleNotFoundError")


def test_the_check_sees_a_cycle(tmp_path):
    """The same child, on two modules that import each other's names, reports the failure."""
    pkg = tmp_path / "tuning_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from tuning_core.b import B\nA = 1\n")
    (pkg / "b.py").write_text("from tuning_core.a import A\nB = 2\n")
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([["tuning_core.a"], [], []])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS"))
    assert "partially initialized module" in json.loads(line.removeprefix("RESULTS"))["tuning_core.a"]
