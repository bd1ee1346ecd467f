"""Fixtures shared by every kind of test: the lab site, throwaway secrets, built images."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder.pipeline import artifact_paths, image_is_current
from builder.site import load_site

PROJECT_DIR = Path(__file__).resolve().parent.parent
# Tests build for the lab site into their own folder, beside the operator's out/.
TEST_OUT = Path(os.environ.get("OKOME_TEST_OUT", PROJECT_DIR / "out" / "lab"))


@pytest.fixture(scope="session")
def lab_site():
    return load_site("lab")


@pytest.fixture(scope="session")
def built_image():
    """Returns a function ROLE → image path, building the lab image unless it is current."""

    def build(role: str) -> Path:
        artifacts = artifact_paths(TEST_OUT, role)
        if not image_is_current(role, "lab", TEST_OUT):
            build = subprocess.run([sys.executable, "-m", "builder", "build", "--role", role,
                                    "--site", "lab", "--out", str(TEST_OUT)])
            if build.returncode != 0:
                pytest.fail(f"building the {role} image failed (exit {build.returncode}); "
                            f"see {artifacts.log}", pytrace=False)
        return artifacts.image

    return build
