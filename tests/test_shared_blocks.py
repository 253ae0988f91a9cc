"""fsr.py and cifs.py each stand alone, so the training-strategy losses, the training step and the
training loop are written in both; this keeps the two copies identical."""

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
