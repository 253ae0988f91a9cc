"""The documentation's drop-in snippets keep running as written, the front page stays short, and
every relative link in README.md, docs/*.md and tests/README.md leads to a file of the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SNIPPETS = ROOT / "docs" / "networks.md"  # "Putting FSR or CIFS into your own network"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "tests" / "README.md"]


def drop_in_snippets() -> list[str]:
    text = SNIPPETS.read_text()
    heading = "## Putting FSR or CIFS into your own network\n"
    section = text[text.index(heading) + len(heading):]
    following = re.search(r"^#{1,2} ", section, re.M)  # the next heading of the same level or above
    section = section[:following.start()] if following else section
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the section holds the FSR snippet, then the CIFS snippet"
    return blocks


def test_fsr_snippet_runs():
    namespace = {}
    exec(drop_in_snippets()[0], namespace)  # noqa: S102 - our own documentation
    # it ran backward through its loss: FSR's auxiliary head received gradients
    assert all(p.grad is not None for p in namespace["net"].fsr.head.parameters())


def test_drop_in_snippets_run():
    namespace = {}
    exec("\n".join(drop_in_snippets()), namespace)  # noqa: S102 - our own documentation
    # the second snippet ran backward through its loss: the CIFS probe received gradients
    assert all(p.grad is not None for p in namespace["net"].cifs.head.parameters())


def test_front_page_is_short():
    lines = README.read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move detail into docs/ (at most 300)"


def relative_links(text: str) -> list[str]:
    """Targets of [text](target) and ![alt](target) outside code, without web or in-page links."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.M | re.S)  # fenced code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


def test_relative_links_lead_to_files():
    assert all(path.is_file() for path in DOCUMENTS)
    broken = []
    for document in DOCUMENTS:
        for target in relative_links(document.read_text()):
            path = (document.parent / target.split("#")[0]).resolve()
            if not path.exists() or not path.is_relative_to(ROOT):
                broken.append(f"{document.relative_to(ROOT)}: {target}")
    assert not broken, "links to nothing: " + ", ".join(broken)
