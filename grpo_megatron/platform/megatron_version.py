"""The megatron-core versions this project runs on, and the start-up check that refuses the others.

The patches in this package reach into megatron-core's private functions (see each one's docstring for the
versions it targets); a release outside the tested range may have moved them, and would fail late and
obscurely, so the run stops at start-up with one line instead.
"""
from __future__ import annotations

import os

from packaging.version import Version

from grpo_megatron.errors import UserError

TESTED_MEGATRON_VERSIONS = ("0.16.1", "0.19.2")
"""Releases the CI runs the tiny example, the trainer-math and the gpu_semantics tests on."""
MIN_MEGATRON = Version("0.16.1")
BELOW_MEGATRON = Version("0.20")  # patch releases of the tested minors are accepted; 0.20 is not
ALLOW_UNTESTED_ENV = "GRPO_MEGATRON_ALLOW_UNTESTED_MEGATRON"


class UnsupportedMegatronError(UserError):
    """The installed megatron-core is outside the range this project is tested on."""


def installed_megatron_version() -> str:
    """megatron-core's version from the package metadata (no megatron import: it takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH, as in some NGC images
        from megatron.core import package_info

        return package_info.__version__


def check_megatron_version(version: str | None = None) -> str:
    """Raise UnsupportedMegatronError for a megatron-core outside [MIN_MEGATRON, BELOW_MEGATRON)."""
    version = version or installed_megatron_version()
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return version
    if not MIN_MEGATRON <= Version(version) < BELOW_MEGATRON:
        raise UnsupportedMegatronError(
            f"megatron-core {version} is outside the tested range >={MIN_MEGATRON},<{BELOW_MEGATRON} (tested: "
            f"{', '.join(TESTED_MEGATRON_VERSIONS)}): install megatron-core=={TESTED_MEGATRON_VERSIONS[-1]}, or set "
            f"{ALLOW_UNTESTED_ENV}=1 to try it anyway")
    return version
