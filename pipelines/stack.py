"""The ZenML stack a run uses for MLflow: the stack's experiment tracker logs the run.

ZenML's MLflow experiment tracker starts the MLflow run of a step before the step runs (the run is named
after the pipeline run, so every tracked step of one pipeline run writes to the same MLflow run) and
links it on the ZenML dashboard; credentials for a tracking server come from the tracker's configuration.
Which tracker a run uses (:func:`select_tracker`):

- the active stack has an MLflow experiment tracker that logs to the config's tracking URI: that one
  (a team's stack, with its server and credentials);
- the active stack is ZenML's ``default`` stack (or one of ours): a stack ``sidrec-local-<hash>`` with the
  default orchestrator and artifact store and an MLflow tracker ``sidrec-mlflow-<hash>`` on the config's
  store (the project's sqlite file by default), one pair per store, registered once and never modified;
  it is made active for this process only (``ZENML_ACTIVE_STACK_ID``), not in the user's ZenML config;
- any other stack (say, Kubeflow without a tracker, or a tracker on another server): no tracker; the
  logging step writes to the config's store directly, as before.

The tracked steps are ``finetune`` / ``warm_finetune`` (live loss curve, system metrics) and
``log_to_mlflow`` (everything else); :func:`tracked_steps` gives the per-step options.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

_LOCAL_STACK, _LOCAL_TRACKER = "sidrec-local-", "sidrec-mlflow-"  # + the store's hash


def _store_hash(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:10]


def select_tracker(cfg) -> Optional[str]:
    """The name of the experiment tracker this run's tracked steps use (``None``: log directly). Selects
    (and on first use registers) the local tracker stack for this process; call it under the store lock."""
    from zenml.client import Client
    from zenml.enums import StackComponentType

    from sidrec.ops.tracking import tracking_uri

    client = Client()
    if os.environ.get("ZENML_ACTIVE_STACK_ID"):  # set by an earlier run of this process: still in this store?
        try:
            client.get_stack(os.environ["ZENML_ACTIVE_STACK_ID"])
        except KeyError:
            os.environ.pop("ZENML_ACTIVE_STACK_ID")
    active = client.active_stack_model
    uri = tracking_uri(cfg)
    trackers = active.components.get(StackComponentType.EXPERIMENT_TRACKER) or []
    for t in trackers:
        if t.flavor_name == "mlflow" and (t.configuration.get("tracking_uri") or "") == uri:
            return t.name  # the stack's own tracker logs where the config says
    if not (active.name == "default" or active.name.startswith(_LOCAL_STACK)):
        return None
    h = _store_hash(uri)
    tracker, stack = f"{_LOCAL_TRACKER}{h}", f"{_LOCAL_STACK}{h}"
    try:
        client.get_stack_component(StackComponentType.EXPERIMENT_TRACKER, tracker)
    except KeyError:
        client.create_stack_component(name=tracker, flavor="mlflow", component_type=StackComponentType.EXPERIMENT_TRACKER,
                                      configuration={"tracking_uri": uri})
    try:
        model = client.get_stack(stack)
    except KeyError:
        base = active.components
        model = client.create_stack(name=stack, components={
            StackComponentType.ORCHESTRATOR: base[StackComponentType.ORCHESTRATOR][0].name,
            StackComponentType.ARTIFACT_STORE: base[StackComponentType.ARTIFACT_STORE][0].name,
            StackComponentType.EXPERIMENT_TRACKER: tracker})
    os.environ["ZENML_ACTIVE_STACK_ID"] = str(model.id)  # this process only
    return tracker


def tracked_steps(cfg, tracker: Optional[str], steps: tuple[str, ...]) -> dict:
    """``pipeline.with_options(steps=...)``: each tracked step uses ``tracker``, logging into the config's
    experiment (ZenML's default would be one experiment per pipeline)."""
    if tracker is None:
        return {}
    from sidrec.ops.tracking import experiment_name

    settings = {"experiment_tracker": {"experiment_name": experiment_name(cfg)}}
    return {name: {"experiment_tracker": tracker, "settings": settings} for name in steps}
