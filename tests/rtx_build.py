"""Building a plan with TensorRT-RTX directly (CPU-only, ahead of time) for the FP8 tests.

A stand-in until pid_export.engine builds with TensorRT-RTX (the TensorRT-library
issue): the same parse -> profile -> compute-capability targets -> build steps.

    python tests/rtx_build.py MODEL.onnx OUT.plan SM89,SM120 SHAPES.json   # prints PEAK_RSS_KIB
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

Shapes = dict[str, tuple[list[int], list[int], list[int]]]


def profile_shapes(cfg, low_hw, opt_hw, high_hw, max_batch: int = 1) -> Shapes:
    """(min, opt, max) input shapes of a PiD export for output sizes low..high (H, W)."""
    scale = cfg.pixel_scale

    def at(batch, hw):
        return {"x": [batch, 3, *hw], "t": [batch], "y": [batch, cfg.txt_max_length, cfg.txt_embed_dim],
                "lq_latent": [batch, cfg.lq_latent_channels, hw[0] // scale, hw[1] // scale],
                "degrade_sigma": [batch]}

    low, opt, high = at(1, low_hw), at(1, opt_hw), at(max_batch, high_hw)
    return {name: (low[name], opt[name], high[name]) for name in low}


def build_plan(onnx_path: Path, capabilities: list[str], shapes: Shapes) -> tuple[bytes | None, list[str]]:
    import tensorrt_rtx as trt

    errors: list[str] = []

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                errors.append(msg)

    logger = Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # always strongly typed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        return None, [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.num_compute_capabilities = len(capabilities)
    for index, capability in enumerate(capabilities):
        config.set_compute_capability(getattr(trt.ComputeCapability, capability), index)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    return (bytes(plan) if plan is not None else None), errors


if __name__ == "__main__":
    onnx_file, out, caps, shapes_file = sys.argv[1:5]
    start = time.perf_counter()
    plan, errs = build_plan(Path(onnx_file), caps.split(","), json.loads(Path(shapes_file).read_text()))
    print(f"BUILD_SECONDS {time.perf_counter() - start:.1f}")
    print(f"PEAK_RSS_KIB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")
    if plan is None:
        print("BUILD_FAILED " + " | ".join(errs[-3:]))
        sys.exit(1)
    Path(out).write_bytes(plan)
