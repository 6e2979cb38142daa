"""The local stack's package (infra/stack/) stays small: one job per module, no class over ~200 lines,
and its public names reachable from ``infra.stack`` as before the split."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "infra" / "stack"
MAX_CLASS_LINES = 200


def _classes() -> dict[str, int]:
    sizes = {}
    for f in sorted(STACK.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.ClassDef):
                sizes[f"{f.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return sizes


def test_no_class_of_the_stack_is_over_200_lines():
    sizes = _classes()
    assert {"supervisor.py:Supervisor", "services.py:Services", "state.py:StackState"} <= set(sizes)
    assert {name: n for name, n in sizes.items() if n > MAX_CLASS_LINES} == {}


def test_the_stack_is_a_package_of_small_modules():
    assert not (ROOT / "infra" / "stack.py").exists()
    assert {f.name for f in STACK.glob("*.py")} >= {"__init__.py", "state.py", "services.py", "supervisor.py"}


@pytest.mark.parametrize("name", ["up", "down", "status", "env", "shell_exports", "default_state_dir", "runtime_dir",
                                  "BUCKET", "WORK_POOL", "CORE_SERVICES", "StackStatus", "ServiceStatus"])
def test_public_names_still_come_from_infra_stack(name):
    from infra import stack

    assert getattr(stack, name) is not None


def test_status_and_env_of_a_folder_never_set_up(tmp_path):
    """Without starting anything: a fresh folder has no services; env says how to set it up, in one line."""
    from infra import stack
    from tuning_core.errors import TunepipeError

    st = stack.status(tmp_path / "none")
    assert (st.services, st.healthy, st.running) == ((), False, False)
    assert str(st).endswith("not set up")
    with pytest.raises(TunepipeError, match=r"not set up yet \(no state.json\); run `tunepipe stack up`"):
        stack.env(tmp_path / "none")
    assert stack.shell_exports({"A": "it's"}) == "export A='it'\"'\"'s'\n"
