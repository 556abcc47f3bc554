"""Offline compile of the training pipeline to a KFP v2 spec (no cluster, no registry, no image build):
steps, their order and resource requests (GPU for finetune/evaluate). See infra/kubeflow/compile.py."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _compile_module():
    spec = importlib.util.spec_from_file_location("sidrec_kfp_compile", REPO / "infra" / "kubeflow" / "compile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("kfp")
    from pipelines.training import training_pipeline
    from sidrec.config import RunConfig

    out = tmp_path_factory.mktemp("kfp") / "training.yaml"
    info = _compile_module().compile_pipeline(training_pipeline, RunConfig().model_dump(mode="json"), out)
    return info, yaml.safe_load(out.read_text())


STEPS = ["ingest", "validate_data", "quality_gate", "text_features", "sid_quantization", "instruction_dataset",
         "finetune", "evaluate", "baselines", "log_to_mlflow"]


def test_every_step_is_a_kfp_task_in_dag_order(compiled):
    info, spec = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {s.replace("_", "-") for s in STEPS}
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert deps["ingest"] == set()
    assert deps["validate-data"] == {"ingest"} and deps["quality-gate"] == {"validate-data"}
    assert deps["finetune"] >= {"instruction-dataset", "sid-quantization"} and "evaluate" not in deps["finetune"]
    assert deps["evaluate"] >= {"finetune", "instruction-dataset", "sid-quantization"}
    assert "quality-gate" in deps["baselines"]
    assert deps["log-to-mlflow"] >= {"evaluate", "baselines", "validate-data"}
    # a topological order exists and matches ZenML's view of the upstream steps
    for name, i in info.items():
        assert {u.replace("_", "-") for u in i["upstream"]} == deps[name.replace("_", "-")]


def test_resources_gpu_for_finetune_and_evaluate(compiled):
    info, spec = compiled
    executors = spec["deploymentSpec"]["executors"]
    comp_of = {name: t["componentRef"]["name"] for name, t in spec["root"]["dag"]["tasks"].items()}
    exec_of = {c: spec["components"][c]["executorLabel"] for c in comp_of.values()}

    def res(task):
        return executors[exec_of[comp_of[task]]]["container"].get("resources", {})

    for gpu_step in ("finetune", "evaluate"):
        r = res(gpu_step)
        assert r["accelerator"]["resourceCount"] == "1" and r["accelerator"]["resourceType"] == "nvidia-tesla-a100", r
        assert r["resourceCpuLimit"] == "8" and r["resourceMemoryLimit"].startswith("32")
    for cpu_step in ("ingest", "sid-quantization", "log-to-mlflow"):
        assert "accelerator" not in res(cpu_step)
    assert info["finetune"]["resources"].gpu_count == 1 and not info["text_features"]["resources"].gpu_count
    # the container runs ZenML's step entrypoint for that step
    c = executors[exec_of[comp_of["finetune"]]]["container"]
    assert "zenml.entrypoints.entrypoint" in " ".join(c["command"]) and "finetune" in c["args"]
    assert info["finetune"]["docker"].parent_image.startswith("pytorch/pytorch")
    # the image's requirements never pin a CPU-only torch (it would replace the parent image's CUDA build)
    docker = info["finetune"]["docker"]
    req = Path(docker.requirements)
    req = req if req.is_absolute() else REPO / req
    pins = [ln.strip() for ln in req.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    torch_pins = [p for p in pins if p.split("==")[0].strip().lower() == "torch"]
    assert torch_pins and not any("+cpu" in p for p in torch_pins), torch_pins
    # ... and otherwise the same pins as the tested CPU install (constraints.txt)
    cpu = [ln.strip() for ln in (REPO / "constraints.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert [p for p in pins if not p.startswith("torch==")] == [p for p in cpu if not p.startswith("torch==")]


def test_retrain_run_config_names_the_retraining_steps(tmp_path):
    """`run.py schedule --zenml` applies retrain_run_config.yaml on Kubeflow: every retraining step has its
    settings there (ZenML drops settings of unknown step names with a warning only), warm_finetune a GPU."""
    pytest.importorskip("kfp")
    from pipelines.retrain import retrain_pipeline
    from sidrec.config import RunConfig

    run_config = REPO / "infra" / "kubeflow" / "retrain_run_config.yaml"
    info = _compile_module().compile_pipeline(retrain_pipeline, RunConfig().model_dump(mode="json"),
                                              tmp_path / "retrain.yaml", run_config=run_config)
    configured = set(yaml.safe_load(run_config.read_text())["steps"])
    assert configured == set(info), (sorted(configured ^ set(info)))
    assert info["warm_finetune"]["resources"].gpu_count == 1 and info["promotion_gate"]["resources"].gpu_count == 1
    assert not info["ingest"]["resources"].gpu_count
