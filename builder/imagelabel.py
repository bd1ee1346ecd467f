"""The label on every image's boot partition: which role image the card holds, for which site.

`okome-image flash --identity-only` reads it before giving a card a node's identity, so a
frontend card never becomes the backend, and a lab card never a production node.
"""

LABEL_FILE = "okome-image.txt"


def image_label(role: str, site: str) -> str:
    return ("# Written by okome-image: the role image this card holds. Do not edit.\n"
            f"role={role}\nsite={site}\n")


def parse_image_label(text: str) -> dict[str, str]:
    """The label's values by name; unknown lines are ignored."""
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            values[name.strip()] = value.strip()
    return values
