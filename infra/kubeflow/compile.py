"""Compile a sidrec ZenML pipeline to a Kubeflow Pipelines (KFP v2) spec, offline.

ZenML's Kubeflow orchestrator compiles the KFP spec inside ``submit_pipeline``, which needs a
registered Kubeflow stack (container registry, remote artifact store, a built image and a
reachable KFP API). This script does the same compilation without any of that:

1. the pipeline is compiled by ZenML on the active (local) stack with ``run_config.yaml``
   (Docker settings, per-step ``ResourceSettings``) -> a snapshot with every step's upstream
   steps and resource settings;
2. each step becomes a KFP container task exactly as ZenML's orchestrator builds it
   (``KubeflowOrchestrator._create_dynamic_component`` and ``_configure_container_resources``:
   the ZenML step entrypoint command, ``.after(upstream)``, CPU/memory limits, GPU limits with
   the ``accelerator`` node selector from the step's ``orchestrator.kubeflow.pod_settings``);
3. ``kfp.compiler.Compiler`` writes the pipeline YAML.

What differs from a real submission: the image name is a placeholder (``--image``; ZenML
would build and push it) and the snapshot id in the step arguments is the nil UUID (ZenML creates the snapshot at submission).

    .venv/bin/python infra/kubeflow/compile.py --config configs/quickstart.yaml --out outputs/training-kfp.yaml
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RUN_CONFIG = HERE / "run_config.yaml"
DEFAULT_IMAGE = "registry.example.com/sidrec/zenml:latest"
PLACEHOLDER_SNAPSHOT_ID = "00000000-0000-0000-0000-000000000000"


def _kubeflow_step_settings(run_config: Path) -> dict[str, dict]:
    """``orchestrator.kubeflow`` settings per step straight from the YAML (ZenML drops settings of
    stack components that the active stack does not have, so the local stack would not keep them)."""
    raw = yaml.safe_load(run_config.read_text()) or {}
    return {name: (s.get("settings") or {}).get("orchestrator.kubeflow") or {} for name, s in (raw.get("steps") or {}).items()}


def _resources(task, rs, accelerator):
    """CPU/memory/GPU limits as ZenML's ``KubeflowOrchestrator._configure_container_resources`` sets them,
    except memory, which is passed as a Kubernetes quantity string ("32G"): ZenML 0.98 passes the float
    from ``ResourceSettings.get_memory()`` and kfp 2.17 rejects it (TypeError), see docs/operations.md."""
    if rs.cpu_count:
        task.set_cpu_limit(str(int(rs.cpu_count)) if float(rs.cpu_count).is_integer() else str(rs.cpu_count))
    mem = rs.get_memory(unit="GB")
    if mem:
        task.set_memory_limit(f"{int(mem) if float(mem).is_integer() else mem}G")
    gpus = rs.gpu_count or 0
    if accelerator and gpus > 0:
        task.set_accelerator_type(accelerator[1]).set_accelerator_limit(gpus)
    return task


def compile_pipeline(pipeline, config: dict, out: Path, run_config: Path = RUN_CONFIG, image: str = DEFAULT_IMAGE) -> dict:
    """Compile ``pipeline`` (a ZenML ``@pipeline`` taking ``config``) to KFP YAML at ``out``.
    Returns ``{step: {"upstream": [...], "resources": ResourceSettings}}`` as ZenML compiled it."""
    from kfp import dsl
    from kfp.compiler import Compiler
    from zenml.entrypoints.step_entrypoint_configuration import StepEntrypointConfiguration
    from zenml.integrations.kubeflow.orchestrators.kubeflow_orchestrator import (
        KFP_ACCELERATOR_NODE_SELECTOR_CONSTRAINT_LABEL,
        KubeflowOrchestrator,
    )

    p = pipeline.with_options(config_path=str(run_config))
    p.prepare(config=config)
    snapshot, _, _ = p._compile(config_path=str(run_config))
    kf = _kubeflow_step_settings(run_config)
    steps = snapshot.step_configurations
    info = {name: {"upstream": sorted(s.spec.upstream_steps), "resources": s.config.resource_settings,
                   "docker": snapshot.pipeline_configuration.docker_settings} for name, s in steps.items()}
    components = {}
    for name in steps:
        args = StepEntrypointConfiguration.get_entrypoint_arguments(step_name=name, snapshot_id=PLACEHOLDER_SNAPSHOT_ID)
        components[name] = KubeflowOrchestrator._create_dynamic_component(
            None, image, StepEntrypointConfiguration.get_entrypoint_command(), args, name)

    @dsl.pipeline(name=f"sidrec-{pipeline.name.replace('_', '-')}", display_name=pipeline.name)
    def kfp_pipeline():  # no return annotation: kfp would read "None" as an output type
        tasks = {}
        for name in steps:  # ZenML's snapshot lists steps in a topological order
            task = components[name]().set_display_name(name).set_caching_options(enable_caching=False)
            task = task.after(*[tasks[u] for u in steps[name].spec.upstream_steps])
            selectors = ((kf.get(name) or {}).get("pod_settings") or {}).get("node_selectors") or {}
            constraint = None
            if KFP_ACCELERATOR_NODE_SELECTOR_CONSTRAINT_LABEL in selectors:
                constraint = (KFP_ACCELERATOR_NODE_SELECTOR_CONSTRAINT_LABEL, selectors[KFP_ACCELERATOR_NODE_SELECTOR_CONSTRAINT_LABEL])
            _resources(task, steps[name].config.resource_settings, constraint)
            tasks[name] = task

    out.parent.mkdir(parents=True, exist_ok=True)
    Compiler().compile(pipeline_func=kfp_pipeline, package_path=str(out))
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="sidrec YAML run config")
    ap.add_argument("--pipeline", choices=["training", "retrain"], default="training")
    ap.add_argument("--out", default="outputs/kfp-pipeline.yaml")
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from pipelines.cli import setup_environment

    setup_environment()
    from sidrec.config import load_config

    cfg = load_config(args.config).model_dump(mode="json")
    if args.pipeline == "training":
        from pipelines.training import training_pipeline as pipe
    else:
        from pipelines.retrain import retrain_pipeline as pipe
    info = compile_pipeline(pipe, cfg, Path(args.out), image=args.image)
    print(f"wrote {args.out}: {len(info)} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
