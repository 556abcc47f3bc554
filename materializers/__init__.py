"""ZenML materializers for sidrec's own artifact types (JSON / Parquet / safetensors; never pickle)."""
from materializers.sidrec_materializers import (
    DatasetMaterializer,
    EntityFeaturesMaterializer,
    EvalReportMaterializer,
    IndexBundleMaterializer,
    InstructionSetMaterializer,
    QualityReportMaterializer,
    TrainedRecommenderMaterializer,
)

__all__ = [
    "DatasetMaterializer",
    "EntityFeaturesMaterializer",
    "EvalReportMaterializer",
    "IndexBundleMaterializer",
    "InstructionSetMaterializer",
    "QualityReportMaterializer",
    "TrainedRecommenderMaterializer",
]
