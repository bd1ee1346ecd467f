"""What the build asks of its host: tools named with their Debian package, the apt mirror."""

import textwrap

import pytest

from builder.errors import UserError
from builder.hosttools import BUILD_TOOLS, require_tools
from builder.mirror import host_mirror


def test_missing_tools_are_named_with_the_packages_to_install():
    with pytest.raises(UserError) as err:
        require_tools({"okome-no-such-tool": "okome-tools", "sh": "dash"})
    assert "okome-no-such-tool" in err.value.message and "sh" not in err.value.message
    assert "apt-get install okome-tools" in err.value.hint


def test_every_build_tool_is_present_here():
    require_tools(BUILD_TOOLS)


def write_sources(tmp_path, name, text):
    (tmp_path / "sources.list.d").mkdir(exist_ok=True)
    (tmp_path / "sources.list.d" / name).write_text(textwrap.dedent(text))


def test_mirror_from_a_deb822_sources_file(tmp_path):
    write_sources(tmp_path, "debian.sources", """\
        Types: deb
        URIs: http://mirror.invalid/debian-security
        Suites: bookworm-security
        Components: main

        Types: deb deb-src
        URIs: http://mirror.invalid/debian/
        Suites: bookworm bookworm-updates
        Components: main contrib
        """)
    assert host_mirror("bookworm", tmp_path) == "http://mirror.invalid/debian"


def test_mirror_from_a_one_line_list_with_options(tmp_path):
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://list.invalid/debian bookworm main\n")
    assert host_mirror("bookworm", tmp_path) == "http://list.invalid/debian"


def test_disabled_files_and_stanzas_are_ignored(tmp_path):
    write_sources(tmp_path, "old.list.disabled", "deb http://off.invalid/debian bookworm main\n")
    write_sources(tmp_path, "a.sources", """\
        Types: deb
        URIs: http://off.invalid/debian
        Suites: bookworm
        Components: main
        Enabled: no
        """)
    with pytest.raises(UserError) as err:
        host_mirror("bookworm", tmp_path)
    assert "--mirror" in err.value.hint
