"""Which GPUs can run an export's precision (no TensorRT or GPU needed to ask).

FP8 (E4M3) tensor cores exist from Ada (compute capability 8.9: RTX 40, L4, L40)
on, and on Hopper (9.0) and Blackwell (10.x, 12.x); Ampere (8.0, 8.6) and older
have none, so TensorRT cannot build or run an FP8 engine for them.
"""

from __future__ import annotations

FP8_MIN_CAPABILITY = (8, 9)


def capability_tuple(capability: str) -> tuple[int, int]:
    """'8.9' (or 'SM89', 'sm_120') -> (8, 9) / (12, 0)."""
    text = capability.strip().lower().removeprefix("sm").lstrip("_")
    if "." in text:
        major, minor = text.split(".", 1)
        return int(major), int(minor)
    if not text.isdigit() or len(text) < 2:
        raise ValueError(f"not a compute capability: {capability!r}")
    return int(text[:-1]), int(text[-1])


def precision_problem(precision: str | None, capability: str, where: str = "this GPU",
                      advice: str = "export with --precision bf16 for it") -> str | None:
    """Why `precision` cannot run on compute capability `capability`, as one sentence; None if it can."""
    major, minor = capability_tuple(capability)
    if precision != "fp8" or (major, minor) >= FP8_MIN_CAPABILITY:
        return None
    return f"FP8 needs Ada or newer (compute capability >= 8.9), and {where} is {major}.{minor}; {advice}"
