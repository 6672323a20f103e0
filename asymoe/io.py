"""Atomic writes: a reader, or a crash, never sees a half-written results file, plot or checkpoint.

Temporary siblings carry the writing process's id (`.<name>.partial-<pid>-<random>`), so that a later run can tell
what an interrupted run left behind from what a running one is writing, and clean up or recover. Files and
directories get the modes a plain `open` / `mkdir` gives (as `save_pretrained`'s), not the owner-only modes of
`tempfile`: other users can read a checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .configuration.configuration_asymoe import write_text_atomically

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|replaced|upcycling)-(?:(?P<pid>\d+)-)?[\w-]+$")


def _temporary_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary sibling of `path`, then rename it onto `path` (creating the parent). The Hub
    bundle's writer (it cannot import this module, so the writer lives there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomically(path, text)


def atomic_save_figure(figure, path: str | os.PathLike) -> Path:
    """Save a matplotlib `figure` as PNG to a temporary sibling of `path`, rename it onto `path` (creating the
    parent) and close the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(path, "partial")
    try:
        figure.savefig(temporary, dpi=120, format="png")
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        temporary.unlink(missing_ok=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def recover_interrupted(target: str | os.PathLike) -> list[str]:
    """Deal with what interrupted writes of `target` left next to it, and say what was done (a warning per action;
    the messages are also returned). A checkpoint an interrupted overwrite had moved aside (`.replaced-*`) is put
    back when `target` is missing, deleted when `target` was published; half-written directories (`.partial-*`,
    and `.upcycling-*` from older versions) are deleted. Siblings of a process that is still running are left."""
    target = Path(target).expanduser().absolute()
    if not target.parent.is_dir():
        return []
    done = []
    leftovers = sorted(target.parent.glob(f".{target.name}.*"), key=lambda p: p.name)
    for path in leftovers:
        match = _LEFTOVER.match(path.name)
        if match is None or match["name"] != target.name or not path.is_dir():
            continue
        if match["pid"] is not None and int(match["pid"]) != os.getpid() and _alive(int(match["pid"])):
            continue  # a concurrent run owns it
        if match["kind"] == "replaced" and not target.exists():
            os.replace(path, target)
            done.append(f"restored {target} from {path.name}, where an interrupted overwrite had moved it")
        else:
            shutil.rmtree(path, ignore_errors=True)
            what = "the previous version of" if match["kind"] == "replaced" else "an interrupted write of"
            done.append(f"removed {path.name}, {what} {target}")
    for message in done:
        warnings.warn(message, stacklevel=2)
    return done


@contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `target` to write into; when the block ends without an error, publish it
    as `target` with one rename (an existing non-empty `target` only with `overwrite`: it is moved aside first,
    then deleted). On an error the temporary directory goes and `target` is untouched. Leftovers of interrupted
    writes of `target` are dealt with first (`recover_interrupted`)."""
    target = Path(target).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory.")
    recover_interrupted(target)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty: choose another directory, or overwrite it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_sibling(target, "partial")
    try:
        temporary.mkdir()
    except PermissionError as err:
        raise PermissionError(f"cannot write into {target.parent} ({err.strerror}): choose an output directory you "
                              "can write to.") from err
    try:
        yield temporary
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if target.exists():
            aside = _temporary_sibling(target, "replaced")
            os.replace(target, aside)
            os.replace(temporary, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
