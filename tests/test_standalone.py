"""The repository stands alone: no file in it names a path outside it."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO

# The author's machine's work folder and the shared folder beside the checkout, spelt so that this
# file does not match itself.
OUTSIDE = re.compile(rb"/wor[k]/|\.\./share[d]\b")


def repository_files() -> list[str]:
    """Tracked files and new files not ignored (what the next commit can hold)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    return sorted({name.decode() for name in listing.stdout.split(b"\0") if name})


def test_no_file_names_a_path_outside_the_repository():
    found = []
    for name in repository_files():
        path = REPO / name
        if not path.is_file():  # deleted in the working tree
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary (npz, pt, images)
            continue
        for number, line in enumerate(data.splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{name}:{number}: {line.decode(errors='replace').strip()}")
    assert not found, "paths outside the repository:\n" + "\n".join(found)
