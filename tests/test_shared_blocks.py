"""fsr.py and cifs.py each stand alone, so the training-strategy losses, the training step and the
training loop are written in both; this keeps the two copies identical and small (the machinery around
the loop is run_support.py's; every file's line budget is in tests/test_layout.py)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"# ---- shared block: (.+?) \(identical in fsr.py and cifs.py\) -+\n(.*?)# ---- end shared block", re.S)


def shared_blocks(name):
    return dict(BLOCK.findall((ROOT / name).read_text()))


def test_both_method_files_have_the_same_shared_blocks():
    fsr, cifs = shared_blocks("fsr.py"), shared_blocks("cifs.py")
    assert set(fsr) == {"strategy losses", "training step", "training loop"}
    assert set(cifs) == set(fsr)
    for name in fsr:
        assert fsr[name] == cifs[name], f"shared block {name!r} differs between fsr.py and cifs.py"


def test_shared_blocks_are_not_empty():
    for name, body in shared_blocks("fsr.py").items():
        assert body.count("\ndef ") >= 1 or body.startswith("def "), name


def test_the_method_files_stay_minimal():
    """The reference scripts: the method, then one flat loop. The shared part is what a reader meets
    twice; the rest of the machinery lives once, in run_support.py."""
    shared = sum(body.count("\n") for body in shared_blocks("fsr.py").values())
    assert shared <= 250, shared
    for name in ("fsr.py", "cifs.py"):
        text = (ROOT / name).read_text()
        assert "def train(" in text and "for epoch in range(" in text  # the epoch loop is in the file
        assert "--benchmark" not in text  # timing lives in benchmarks/speed.py
