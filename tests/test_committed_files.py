"""No committed file carries an absolute path of the machine it was made on (a converted checkpoint's
metadata used to name the converting machine's directories), and the converter writes relative ones."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MACHINE_PATHS = re.compile(rb"/(?:home|Users|root|work)/[A-Za-z0-9_.-]+")


def test_no_committed_file_names_a_machine_path():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    leaks = {}
    for name in files.decode().split("\0"):
        path = REPO / name
        if name and path.is_file():
            found = MACHINE_PATHS.search(path.read_bytes()) or (str(REPO).encode() in path.read_bytes() and REPO)
            if found:
                leaks[name] = found
    assert leaks == {}


def test_the_converter_records_the_source_relative_to_the_checkpoint(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from convert_hf_to_megatron import source_path
    finally:
        sys.path.pop(0)
    assert source_path(tmp_path / "models" / "hf", tmp_path / "ckpts" / "mcore") == "../../models/hf"
