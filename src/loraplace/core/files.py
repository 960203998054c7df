"""Writing into a study directory or cache so that a crash never leaves half a file or half an adapter.

Usage::

    with atomic_dir("studies/x/adapters/a") as tmp:   # fill tmp; it replaces the target in one rename
        peft_model.save_pretrained(tmp)
    write_text_atomic(Path("studies/x/config.yaml"), text)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file atomically (a temporary sibling, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary sibling of ``target`` to fill; on success it replaces ``target`` in one
    rename, so a crash never leaves a half-written adapter or model cache behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for root, dirs, files in os.walk(tmp):  # mkdtemp makes 0700; give the usual modes
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~umask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
