"""The Debian mirror to bootstrap from: the one the build host's apt already uses."""

import email.utils
import hashlib
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from builder.errors import UserError

APT_SOURCES = Path("/etc/apt")


def _entries(path: Path) -> list[tuple[str, list[str], list[str]]]:
    """(URI, suites, components) of each `deb` entry in a .list or deb822 .sources file."""
    entries = []
    text = path.read_text(errors="replace")
    if path.suffix == ".list":
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], [words[2]], words[3:]))
        return entries

    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            entries.append((uri, fields.get("suites", "").split(),
                            fields.get("components", "").split()))
    return entries


def host_mirror(suite: str, sources_dir: Path = APT_SOURCES) -> str:
    """The URI of the host's apt source that serves `suite` (e.g. bookworm) with `main`."""
    files = [sources_dir / "sources.list"] if (sources_dir / "sources.list").exists() else []
    files += sorted((sources_dir / "sources.list.d").glob("*.list"))
    files += sorted((sources_dir / "sources.list.d").glob("*.sources"))
    for path in files:
        for uri, suites, components in _entries(path):
            if suite in suites and "main" in components:
                return uri.rstrip("/")
    raise UserError(f"no Debian mirror for {suite} in the host's apt sources",
                    "pass --mirror URL")


@dataclass(frozen=True)
class Release:
    """The state of a mirror's suite, from its signed Release file."""

    digest: str  # SHA-256 of the file: it lists the hash of every package index of the suite
    epoch: int  # its Date: when the suite last changed


def mirror_release(mirror: str, suite: str, timeout: float = 20) -> Release:
    """The suite's Release file on the mirror, fetched like mmdebstrap's apt fetches (proxies
    from the environment); raises OSError when the mirror does not answer."""
    url = f"{mirror.rstrip('/')}/dists/{suite}/InRelease"
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        text = answer.read()
    date = re.search(rb"^Date: (.+)$", text, re.M)
    if not date:
        raise OSError(f"{url} has no Date: field")
    epoch = int(email.utils.parsedate_to_datetime(date.group(1).decode()).timestamp())
    return Release(hashlib.sha256(text).hexdigest(), epoch)


def checked_mirror(url: str) -> str:
    """A mirror given with --mirror, refused early unless it can be one: http(s) with a host, or
    file:// naming a folder."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https") and parts.netloc:
        return url.rstrip("/")
    if parts.scheme == "file" and Path(parts.path).is_dir():
        return url.rstrip("/")
    raise UserError(f"--mirror '{url}' is not a Debian mirror URL",
                    "give http://HOST/debian (or https://, or file:// of a local mirror), or "
                    "leave it out to use the host's apt sources")
