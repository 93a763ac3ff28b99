"""pid-run's output files: checked and claimed before the model is opened, replaced atomically at the end.

A default name (`<latents>.png`, else `<latents>-2.png`, ...) is claimed when the run
starts by creating an empty placeholder with O_CREAT|O_EXCL: of any number of runs
starting together, exactly one gets each name, so none overwrites another's image.
The finished image is written to a temporary file in the same directory and renamed
onto the placeholder (os.replace: readers see the empty placeholder or the whole
image, never part of it). A run that fails or is interrupted removes its temporary
files and its own placeholders (only if they are still the empty files it made).

An explicit `--out PATH` is written exactly there (replacing a file of that name), so
it is checked (parent directory exists and is writable, PATH is not a directory) but
not claimed: the old file stays in place until the new one is complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .io import OUTPUT_SUFFIXES, InputError, output_paths

MAX_DEFAULT_NAMES = 10_000  # <stem>-2 ... <stem>-N: far more than anyone keeps beside one latent


def check_output_location(path: Path, batch: int) -> None:
    """Every file of the output can be written: the directory exists and is writable, no name is a directory."""
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"output directory {parent} of {path} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: directory {parent} is not writable")
    for target in output_paths(path, batch):
        if target.is_dir():
            raise InputError(f"output {target} is a directory: give a file name ending in "
                             f"{' or '.join(OUTPUT_SUFFIXES)}")


@dataclass
class OutputClaim:
    """The output files of one run: `targets` (what the user will get) and the placeholders this run made."""

    path: Path
    targets: list[Path]
    placeholders: dict[Path, tuple[int, int]] = field(default_factory=dict)  # path -> (st_dev, st_ino)

    def release(self) -> None:
        """Remove this run's placeholders that are still its own empty files (a failed or interrupted run)."""
        for placeholder, identity in list(self.placeholders.items()):
            try:
                info = placeholder.stat()
                if (info.st_dev, info.st_ino) == identity and info.st_size == 0:
                    placeholder.unlink()
            except FileNotFoundError:
                pass
            del self.placeholders[placeholder]

    def written(self) -> None:
        """The images are in place: the placeholders were replaced by them."""
        self.placeholders.clear()


def _claim(targets: list[Path]) -> OutputClaim | None:
    """Create every target exclusively, or none (None when one already exists)."""
    claim = OutputClaim(targets[0], targets)
    try:
        for target in targets:
            try:
                handle = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                claim.release()
                return None
            try:
                info = os.fstat(handle)
                claim.placeholders[target] = (info.st_dev, info.st_ino)
            finally:
                os.close(handle)
    except BaseException:
        claim.release()
        raise
    return claim


def claim_default_output(latents: Path, batch: int, bit_depth: int = 8) -> OutputClaim:
    """`<stem>.png` beside the latents, else the first free `<stem>-N.png`, claimed atomically."""
    first = latents.with_suffix(".png")
    check_output_location(first, batch)
    if bit_depth not in (8, 16):
        raise InputError(f"bit depth must be 8 or 16, got {bit_depth}")
    for number in range(1, MAX_DEFAULT_NAMES + 1):
        candidate = first if number == 1 else latents.with_name(f"{latents.stem}-{number}.png")
        targets = output_paths(candidate, batch)
        if any(target.exists() or target.is_symlink() for target in targets):
            continue
        try:
            claim = _claim(targets)
        except OSError as exc:
            raise InputError(f"cannot create {candidate}: {exc.strerror or exc}") from None
        if claim is not None:
            return OutputClaim(candidate, claim.targets, claim.placeholders)
    raise InputError(f"no free output name beside {latents} ({first.name} ... {latents.stem}-{MAX_DEFAULT_NAMES}.png "
                     "all exist): pass --out PATH")


def explicit_output(path: Path, batch: int) -> OutputClaim:
    """`--out PATH`: checked, not claimed (it may replace an existing file of that name)."""
    check_output_location(path, batch)
    return OutputClaim(path, output_paths(path, batch))


__all__ = ["OutputClaim", "check_output_location", "claim_default_output", "explicit_output"]
