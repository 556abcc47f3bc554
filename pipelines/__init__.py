from pipelines.training import training_pipeline

__all__ = ["training_pipeline"]
