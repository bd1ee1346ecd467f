"""docs/runbook.md covers every incident type with commands the lab test can run."""

from tests.runbook import PLACES, RUNBOOK, runbook_blocks

INCIDENTS = ["Gateway down", "Frontend node dead", "VIP on both nodes, or on neither",
             "Backend down", "Cache disk full", "SD card failing", "Rate-limit storm"]


def test_every_incident_has_a_how_to_see_it_block():
    sections = {block.section for block in runbook_blocks()}
    assert [incident for incident in INCIDENTS if incident not in sections] == []


def test_no_sh_block_is_left_out():
    """A block whose first line names no place would not be run by the lab test."""
    assert RUNBOOK.read_text().count("```sh\n") == len(runbook_blocks())


def test_every_block_says_where_it_runs():
    for block in runbook_blocks():
        assert block.place in PLACES, f"docs/runbook.md line {block.line - 1}: '# {block.place}'"
        assert block.commands.strip()


def test_blocks_are_found_with_their_section_and_line():
    text = "# Runbook\n\n## One\n\n```sh\n# on a frontend\ntrue\nfalse\n```\n\n## Two\n"
    [block] = runbook_blocks(text)
    assert (block.section, block.place, block.commands, block.line) == \
        ("One", "on a frontend", "true\nfalse\n", 7)
