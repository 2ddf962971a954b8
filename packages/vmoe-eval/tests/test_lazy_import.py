"""vmoe-eval installed costs a router lookup nothing: the plugin host imports its entry point
(`vmoe_eval._builtins`), not the evaluation code, which comes on first use of a name."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import vmoe_eval

EVALUATION_CODE = ("vmoe_eval.evaluators", "vmoe_train", "tensorflow_datasets", "matplotlib")

PROBE = """
import sys
import vmoe_routing
assert "bpr" in vmoe_routing.available_routers()
assert "vmoe_eval._builtins" in sys.modules, "the entry point was not loaded"
print([m for m in {modules!r} if m in sys.modules])
import vmoe_eval, vmoe_train
print(vmoe_eval.available_evaluators(), "evaluators" in vmoe_train.available_callbacks())
"""


def test_a_router_lookup_loads_the_entry_point_but_not_the_evaluation_code():
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(modules=EVALUATION_CODE)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == ["[]", "['accuracy', 'fewshot'] True"]


def test_every_public_name_resolves_to_its_module_and_type_checkers_see_the_same():
    for name, module in vmoe_eval._MODULE_OF.items():
        assert getattr(vmoe_eval, name) is getattr(sys.modules[module], name), name
    assert "sweep" in dir(vmoe_eval)
    tree = ast.parse(pathlib.Path(vmoe_eval.__file__).read_text())
    guarded = next(
        n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
    )
    imported = {
        alias.name: node.module
        for node in guarded.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert imported == vmoe_eval._MODULE_OF
