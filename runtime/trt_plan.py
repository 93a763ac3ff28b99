"""Checks on a TensorRT plan, its sidecar and its profiles that need no TensorRT library.

What a user meets first, before any engine is deserialised: is this file a plan at all,
which library built it, can it run on the device that will run it (one check,
`why_engine_cannot_run`, for pid-run's preflight, the backend and pid-export's
`--verify` refusal), and is a shape inside one of the engine's profiles. Used by the
TensorRT backend and by `pid_export` (which must not import the backend for these).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .backends.base import BackendError
from .engine_metadata import EngineMetadata
from .signature import BY_NAME, INPUT_NAMES
from .trt_library import RTX, LibraryError, Shape, TensorRTLibrary, library_for_plan, rtx_default_targets_include

ONNX_FALLBACK = "pid-run can run the export directory's model.onnx with ONNX Runtime instead"
RUNTIME_CACHE_SUFFIX = ".runtime.cache"

ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def require_tensorrt(engine_meta: EngineMetadata | None = None, choice: str | None = None,
                     plan_name: str = "engine plan") -> TensorRTLibrary:
    """The library that can load this plan; BackendError (one line) when there is none."""
    try:
        return library_for_plan(engine_meta, choice, plan_name)
    except LibraryError as exc:
        raise BackendError(f"{exc} ({ONNX_FALLBACK})") from None


# ---------------------------------------------------------------------------
# Checks on a plan file and its metadata sidecar (no TensorRT needed)


def probe_plan(path: Path) -> str | None:
    """What is obviously wrong with `path` as a TensorRT plan, or None.

    The plan format itself is undocumented, so this only recognises files that
    are certainly something else; TensorRT has the last word when it loads.
    """
    path = Path(path)
    if not path.exists():
        return f"engine file {path} does not exist"
    if path.is_dir():
        return f"engine path {path} is a directory (expected an engine.plan file)"
    with path.open("rb") as handle:
        head = handle.read(64)
    if not head:
        return f"{path} is empty, not a TensorRT engine (the build may have been interrupted)"
    kind = _known_non_plan(head, path.suffix.lower())
    if kind is not None:
        return f"{path} is {kind}, not a TensorRT engine plan"
    return None


def _known_non_plan(head: bytes, suffix: str) -> str | None:
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "a JSON file"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (.npz / .pth?)"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file"
    if suffix == ".onnx" or _looks_like_onnx(head):
        return "an ONNX model (build an engine with pid-export, or run it with the ONNX Runtime backend)"
    return None


def _looks_like_onnx(head: bytes) -> bool:
    # An ONNX ModelProto starts with field 1 (ir_version, a small varint),
    # followed by another ModelProto field tag (producer, domain, graph, opsets).
    model_proto_tags = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72}
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 30 and head[2] in model_proto_tags


def engine_metadata_path(plan_path: Path) -> Path:
    """The sidecar of `engine.plan` is `engine.json` (same stem, next to it)."""
    return Path(plan_path).with_suffix(".json")


def load_engine_metadata(plan_path: Path) -> EngineMetadata | None:
    """The plan's sidecar, None when there is none; BackendError (one line) when unreadable or wrong."""
    path = engine_metadata_path(plan_path)
    return EngineMetadata.load(path) if path.exists() else None


def runtime_cache_path(plan_path: Path) -> Path:
    """TensorRT-RTX's JIT kernel cache of `engine.plan` is `engine.runtime.cache` beside it."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.stem + RUNTIME_CACHE_SUFFIX)


def check_plan_compatibility(engine_meta: EngineMetadata | Mapping[str, Any], library: str, library_version: str,
                             compute_capability: str) -> str | None:
    """The sentence the library would log when refusing this plan on this GPU, or None.

    Enterprise TensorRT: a plan runs only with the exact library version and the GPU
    compute capability it was built with (TensorRT's own wording: "expecting" is this
    machine, "got" the plan). TensorRT-RTX: a plan runs on the compute capabilities it
    targets (its defaults, or the --compute-capability list it was built for); its
    version fit is left to `get_engine_validity`. Fields a sidecar lacks are not checked.
    """
    if not isinstance(engine_meta, EngineMetadata):
        engine_meta = EngineMetadata.from_dict(engine_meta)
    targets = engine_meta.compute_capabilities
    if library == RTX:
        default = engine_meta.targets_library_defaults
        fits = rtx_default_targets_include(compute_capability) if default else compute_capability in targets
        if targets and not fits:
            return (f"engine plan targets compute capability {', '.join(targets)} and this GPU is "
                    f"{compute_capability}: TensorRT-RTX engines run on RTX-class GPUs only (use enterprise "
                    f"TensorRT on data-centre GPUs: pid-export --trt tensorrt), or rebuild with "
                    f"--compute-capability {compute_capability}")
        return None
    built_version = engine_meta.library_version
    if built_version and str(built_version) != library_version:
        return (f"engine plan is not compatible with this version of TensorRT, expecting library "
                f"version {library_version} got {built_version}; rebuild it here with pid-export")
    if targets and compute_capability not in targets:
        gpu = engine_meta.gpu_name
        built_on = f" ({gpu})" if gpu else ""
        return (f"engine plan was generated on an incompatible device{built_on}, expecting compute "
                f"{compute_capability} got compute {', '.join(targets)}; rebuild it on this GPU with pid-export")
    return None


def why_plan_cannot_run_here(plan_path: Path, trt: str | None = None,
                             device: torch.device | str | None = None) -> str | None:
    """Why `plan_path` cannot run on `device` (default: the current CUDA device): no library
    for it, no GPU, a GPU it was not built for; from its sidecar, without deserialising it.
    None when it may run."""
    try:
        engine_meta = load_engine_metadata(plan_path)
        lib = library_for_plan(engine_meta, trt, Path(plan_path).name)
    except BackendError as exc:
        return str(exc)
    return why_engine_cannot_run(lib, engine_meta, device)


def why_engine_cannot_run(lib: TensorRTLibrary, engine_meta: EngineMetadata | None,
                          device: torch.device | str | None = None) -> str | None:
    """Why an engine of `lib` described by `engine_meta` (a sidecar, or what a build will
    write; None: nothing known) cannot run on `device`, or None. The one check behind the
    runtime's preflight, the backend and pid-export's `--verify` refusal; asks torch only
    about the device (`pid-run --device cuda:1` is checked on cuda:1, not on cuda:0)."""
    dev = torch.device("cuda") if device is None or str(device) == "auto" else torch.device(device)
    if dev.type != "cuda":
        return f"{lib.label} runs engines on a CUDA GPU, not on {dev}"
    if not torch.cuda.is_available():
        return f"{lib.label} runs engines on a CUDA GPU and none is visible"
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        return f"there is no {dev} (this machine has {torch.cuda.device_count()} CUDA GPU(s))"
    if engine_meta is None:
        return None
    here = compute_capability_string(torch.device("cuda", index))
    return check_plan_compatibility(engine_meta, lib.key, lib.version, here)


def out_of_memory_line(shapes: Mapping[str, Shape], device: torch.device) -> str:
    """The one line for a decode whose buffers do not fit on `device`, with the ways out."""
    batch, _, height, width = shapes["x"]
    return (f"out of GPU memory on {device} for batch {batch} at {height}x{width}: decode a smaller --size or "
            f"--batch-size, or free the GPU (other processes, --device cuda:N)")


def shapes_text(shapes: Mapping[str, Shape]) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())


def describe_invalidity(diagnostics: int, flags: Mapping[str, int]) -> str:
    """TensorRT-RTX's `get_engine_validity` diagnostics bitmask as words (`flags`: the
    library's EngineInvalidityDiagnostics names and values)."""
    words = {
        "VERSION_MISMATCH": "it was built by another TensorRT-RTX version",
        "UNSUPPORTED_CC": "it was not built for this GPU's compute capability",
        "OLD_CUDA_DRIVER": "the CUDA driver is too old",
        "OLD_CUDA_RUNTIME": "the CUDA runtime is too old",
        "INSUFFICIENT_GPU_MEMORY": "the GPU has too little memory",
        "MALFORMED_ENGINE": "the file is damaged or not a TensorRT-RTX plan",
        "CUDA_ERROR": "CUDA reported an error while checking",
    }
    found = [words.get(name, name.lower()) for name, bit in flags.items() if diagnostics & bit]
    return "; ".join(found) or "no reason was given"


def compute_capability_string(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def profile_violation(shapes: Mapping[str, Shape],
                      ranges: Mapping[str, tuple[Shape, Shape]]) -> str | None:
    """First input dimension outside the engine's [min, max] profile, as a sentence; else None.

    `ranges[name] = (min_shape, max_shape)` from `get_tensor_profile_shape`.
    The output size (x) is reported first since it is what users choose.
    """
    for name in INPUT_NAMES:
        if name not in shapes or name not in ranges:
            continue
        shape, (low, high) = shapes[name], ranges[name]
        if len(shape) != len(low):
            return f"input {name} has shape {list(shape)}; the engine expects {len(low)} dimensions"
        labels = BY_NAME[name].labels
        for axis, (value, lo, hi) in enumerate(zip(shape, low, high)):
            if lo <= value <= hi:
                continue
            label = labels[axis] if axis < len(labels) else f"dimension {axis}"
            if name == "x" and axis in (2, 3):
                return (f"output size {shape[2]}x{shape[3]} is outside the engine profile "
                        f"{low[2]}x{low[3]} .. {high[2]}x{high[3]} (HxW); use an engine built for it "
                        f"(pid-export --min/--max HxW) or the export's model.onnx")
            allowed = f"{lo}" if lo == hi else f"{lo}..{hi}"
            return f"{label} {value} (input {name}) is outside the engine profile: allowed {allowed}"
    return None


def select_profile(shapes: Mapping[str, Shape], profiles: Sequence[Mapping[str, tuple[Shape, Shape, Shape]]]) -> int:
    """Index of the optimization profile to run `shapes` with; BackendError when none covers them.

    Among the profiles whose [min, max] ranges cover every input, the one whose opt
    output size (then batch) is nearest, in pixels, wins: its kernels were tuned for
    the closest shape. With none covering, the nearest profile's violation is reported.
    """
    def distance(profile: Mapping[str, tuple[Shape, Shape, Shape]]) -> tuple[int, int]:
        opt, x = profile["x"][1], shapes["x"]
        return abs(x[2] - opt[2]) + abs(x[3] - opt[3]), abs(x[0] - opt[0])

    if not profiles:
        raise BackendError("the engine has no optimization profile")
    ranked = sorted(range(len(profiles)), key=lambda i: (distance(profiles[i]), i))
    for index in ranked:
        ranges = {name: (low, high) for name, (low, _opt, high) in profiles[index].items()}
        if profile_violation(shapes, ranges) is None:
            return index
    union = union_ranges(profiles)
    problem = profile_violation(shapes, union) or profile_violation(
        shapes, {name: (low, high) for name, (low, _opt, high) in profiles[ranked[0]].items()})
    raise BackendError(problem or "no optimization profile of the engine covers these shapes")


def union_ranges(profiles: Sequence[Mapping[str, tuple[Shape, Shape, Shape]]]) -> dict[str, tuple[Shape, Shape]]:
    """Per input: the elementwise smallest min and largest max over all profiles."""
    union: dict[str, tuple[Shape, Shape]] = {}
    for profile in profiles:
        for name, (low, _opt, high) in profile.items():
            if name in union:
                old_low, old_high = union[name]
                low = tuple(min(a, b) for a, b in zip(old_low, low))
                high = tuple(max(a, b) for a, b in zip(old_high, high))
            union[name] = (tuple(low), tuple(high))
    return union
