"""The layout of the project as the design asks for it: small files that say what they hold, each
with a line budget (a cap on a few files only moves the growth into the others), models.py holding
the networks and importing nothing of ours, and method files that hand no function of their own to
the plumbing (no callbacks: every name train() uses is defined above it or a plain call)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = {"attacks", "cifs", "data", "evaluate", "fsr", "models", "progress", "run_support"}
BUDGETS = {  # lines per Python file of the project (tests apart)
    "fsr.py": 560, "cifs.py": 680, "models.py": 525, "data.py": 425, "run_support.py": 660, "progress.py": 155,
    "attacks.py": 600, "evaluate.py": 1280, "benchmarks/speed.py": 840, "benchmarks/fmnist_study.py": 355,
}
# The restructuring (#25) left 5,417 lines; then +155 for #27 (refusals, NaN stop, signals, full disk,
# --data-root), +5 for #26 and the merges, and #28's RobustBench export, weights-only files and monitoring progress.
# #29: the Fashion-MNIST study (benchmarks/fmnist_study.py, 352), cifs.py's smallcnn defaults (+6) and
# models.py's smallcnn_wide, the study's capacity control (+3).
TOTAL_BUDGET = 6030


def lines(name: str) -> int:
    return (ROOT / name).read_text().count("\n")


def test_every_python_file_has_a_budget():
    files = {str(p.relative_to(ROOT)) for p in [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]}
    assert files == set(BUDGETS), files ^ set(BUDGETS)


def test_every_file_keeps_its_budget_and_so_does_the_whole():
    over = {name: lines(name) for name, budget in BUDGETS.items() if lines(name) > budget}
    assert not over, f"over budget: {over} (budgets {BUDGETS})"
    assert sum(lines(name) for name in BUDGETS) <= TOTAL_BUDGET


def imported_modules(name: str) -> set:
    tree = ast.parse((ROOT / name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_models_py_holds_the_networks_and_imports_nothing_of_ours():
    assert not imported_modules("models.py") & OURS
    import models
    assert {"Network", "build_model", "MODELS", "official_to_ours", "count_parameters"} <= set(vars(models))
    for other in ("load_dataset", "DeviceLoader", "parse_args", "save_checkpoint", "count_flops", "EpochProgress"):
        assert other not in vars(models), other


def test_the_plumbing_never_imports_a_method_file():
    for name in ("data.py", "run_support.py", "progress.py", "models.py"):
        assert not imported_modules(name) & {"fsr", "cifs", "evaluate"}, name


def test_train_hands_no_function_of_its_file_to_the_plumbing():
    """No callbacks: no call from fsr.py / cifs.py into run_support, data or progress passes one of the
    file's own functions (what crosses into the plumbing is data, never behaviour)."""
    for name in ("fsr.py", "cifs.py"):
        tree = ast.parse((ROOT / name).read_text())
        own = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        plumbing = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                    and node.module in ("run_support", "data", "progress") for alias in node.names}
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Name) and node.func.id in plumbing]
        assert len(calls) > 20  # train() does call the plumbing, plainly
        passed = [(call.func.id, arg.id) for call in calls for arg in [*call.args, *(k.value for k in call.keywords)]
                  if isinstance(arg, ast.Name) and arg.id in own]
        assert passed == [], (name, passed)
