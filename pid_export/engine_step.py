"""The export's engine step: build the planned engine in the export directory, then verify it.

What is built was decided before the export (`engine_plan.plan_engine`); this step only
carries it out: `engine.build_planned`, then, with `plan.verify`, `verify.verify_engine`
against the float32 network. A plan that fails verification is set aside as
rejected-engine.plan (the runtime would otherwise load it) and the step fails.
"""

from __future__ import annotations

from pathlib import Path

from pid_runtime.metadata import ONNX_NAME
from pid_runtime.trt_plan import engine_metadata_path

from .engine import build_planned
from .engine_errors import EngineError
from .engine_plan import EnginePlan
from .load_step import LoadedNetwork
from .stages import PipelineError, Stages, silent_stages

REJECTED_PREFIX = "rejected-"


def build_and_verify(export_dir: Path, plan: EnginePlan, reference: LoadedNetwork | None = None,
                     stages: Stages | None = None) -> Path:
    """engine.plan in `export_dir` as `plan` says; with `plan.verify`, compared with `reference`
    (the float32 PidNet the export came from). Returns the plan's path."""
    from .interrupts import stage_boundary
    from .verify import require_passed, verify_engine

    stages = stages or silent_stages()
    onnx_path = export_dir / ONNX_NAME
    try:
        with stages(f"building the {plan.library.label} engine ({plan.precision}, {len(plan.profiles)} profile(s): "
                    f"{plan.sizes()})"):
            engine = build_planned(onnx_path, export_dir, plan, log=stages.detail)
            stages.detail(f"{engine.name} ({engine.stat().st_size / 1e6:.1f} MB)")
        if plan.verify:
            if reference is None:
                raise PipelineError("--verify needs the float32 network the engine was exported from")
            with stages("verifying the engine against the float32 PyTorch network (min, opt, max sizes)"):
                stage_boundary("verify", stages.detail)
                try:
                    require_passed(verify_engine(engine, onnx_path, net=reference.net, log=stages.detail))
                except EngineError:
                    if engine.exists():
                        stages.detail(f"the plan is kept as {set_aside_rejected(engine)}, not as {engine.name}")
                    raise
    except EngineError as exc:
        raise PipelineError(str(exc)) from None
    return engine


def set_aside_rejected(plan_path: Path) -> Path:
    """Move a plan that failed verification (and its sidecar) out of the way of the runtime,
    which loads `engine.plan`: it becomes `rejected-engine.plan` (+ `.json`) beside it."""
    plan_path = Path(plan_path)
    rejected = plan_path.with_name(REJECTED_PREFIX + plan_path.name)
    sidecar = engine_metadata_path(plan_path)
    plan_path.replace(rejected)
    if sidecar.exists():
        sidecar.replace(engine_metadata_path(rejected))
    return rejected
