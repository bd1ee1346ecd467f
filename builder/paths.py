"""Where the definitions live: images/, stages/, overlays/ and sites/ of a project folder.

The folder is this checkout, or the one $OKOME_IMAGE_PROJECT names (a copy with extra roles,
or a test's own tree).
"""

import os
from pathlib import Path

BUILDER_DIR = Path(__file__).resolve().parent
PROJECT_DIR = Path(os.environ.get("OKOME_IMAGE_PROJECT") or BUILDER_DIR.parent).resolve()
IMAGES_DIR = PROJECT_DIR / "images"
STAGES_DIR = PROJECT_DIR / "stages"
OVERLAYS_DIR = PROJECT_DIR / "overlays"
SITES_DIR = PROJECT_DIR / "sites"
