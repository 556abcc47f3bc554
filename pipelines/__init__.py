"""ZenML pipelines and the ZenML-aware CLI. Importing this package does not import ZenML: the CLI
(`pipelines.cli`) sets up the environment (state folder, quiet and colour-free logging, offline
flags) before anything loads ZenML."""


def __getattr__(name):
    if name == "training_pipeline":
        from pipelines.training import training_pipeline

        return training_pipeline
    raise AttributeError(name)


__all__ = ["training_pipeline"]
