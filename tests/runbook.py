"""The "how to see it" blocks of docs/runbook.md: fenced `sh` blocks whose first line says where
they run (`# on a frontend`, ...). The lab test runs each of them; the unit test checks that
every incident has one and that each names a known place."""

import re
from dataclasses import dataclass
from pathlib import Path

RUNBOOK = Path(__file__).resolve().parent.parent / "docs" / "runbook.md"
PLACES = ("on a frontend", "on the backend", "on any node", "from the admin network")

_BLOCK = re.compile(r"^```sh\n# (?P<place>[^\n]*)\n(?P<commands>.*?)^```$", re.M | re.S)


@dataclass(frozen=True)
class RunbookBlock:
    section: str  # the incident's heading
    place: str
    commands: str
    line: int  # of the block's first command, in docs/runbook.md


def runbook_blocks(text: str | None = None) -> list[RunbookBlock]:
    text = RUNBOOK.read_text() if text is None else text
    headings = [(m.start(), m.group(1)) for m in re.finditer(r"^## (.*)$", text, re.M)]
    blocks = []
    for match in _BLOCK.finditer(text):
        section = next((title for start, title in reversed(headings)
                        if start < match.start()), "")
        line = text.count("\n", 0, match.start("commands")) + 1
        blocks.append(RunbookBlock(section, match.group("place"), match.group("commands"), line))
    return blocks
