"""One materializer per sidrec artifact type.

Each type knows how to ``save(dir)`` / ``load(dir)`` itself in safe formats; the materializer
only moves that folder in and out of the artifact store (local or remote) and adds a
visualization and metadata. Nothing here pickles.
"""
from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Dict, Tuple, Type

from zenml.enums import ArtifactType, VisualizationType
from zenml.io import fileio
from zenml.materializers.base_materializer import BaseMaterializer
from zenml.utils import io_utils

from sidrec.artifacts import EntityFeatures, EvalReport, IndexBundle, InstructionSet, TrainedRecommender
from sidrec.data.dataset import Dataset
from sidrec.ops.reports import quality_html
from sidrec.data.validation import QualityReport


def _is_local(uri: str) -> bool:
    return "://" not in uri


class _FolderMaterializer:
    """Save/load through the type's own ``save(dir)``/``load(dir)``."""

    SUBDIR: ClassVar[str] = "data"

    def _path(self) -> str:
        return os.path.join(self.uri, self.SUBDIR)

    def save(self, data: Any) -> None:
        if _is_local(self.uri):
            target = Path(self._path())
            tmp = Path(tempfile.mkdtemp(prefix=".sidrec-", dir=self.uri if os.path.isdir(self.uri) else None))
            try:
                data.save(tmp / "out")
                if target.exists():
                    shutil.rmtree(target)
                (tmp / "out").rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        with self.get_temporary_directory(delete_at_exit=True) as tmp:
            data.save(Path(tmp) / "out")
            io_utils.copy_dir(str(Path(tmp) / "out"), self._path(), overwrite=True)

    def _local_copy(self) -> Path:
        if _is_local(self.uri):
            return Path(self._path())
        with self.get_temporary_directory(delete_at_exit=False, delete_after_step_execution=False) as tmp:
            io_utils.copy_dir(self._path(), str(Path(tmp) / "in"), overwrite=True)
            return Path(tmp) / "in"

    def load(self, data_type: Type[Any]) -> Any:
        return data_type.load(self._local_copy())

    def _write(self, name: str, text: str) -> str:
        uri = os.path.join(self.uri, name)
        with fileio.open(uri, "w") as f:
            f.write(text)
        return uri


def _table_html(title: str, rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<html><body><h3>{html.escape(title)}</h3><table border='1' cellpadding='4'>{body}</table></body></html>"


class DatasetMaterializer(_FolderMaterializer, BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (Dataset,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save_visualizations(self, data: Dataset) -> Dict[str, VisualizationType]:
        stats = list(data.stats().items())
        head = data.interactions.head(20).to_html(index=False)
        page = _table_html(f"Dataset {data.name}", stats).replace("</body>", f"<h4>interactions (first 20)</h4>{head}</body>")
        return {self._write("dataset.html", page): VisualizationType.HTML}

    def extract_metadata(self, data: Dataset) -> Dict[str, Any]:
        return {**{k: v for k, v in data.stats().items()}, "fingerprint": data.fingerprint()}

    def compute_content_hash(self, data: Dataset):
        return data.fingerprint()


class _QualityFolder:
    """Folder form of a QualityReport: report.json + the Great Expectations Data Docs site."""

    def __init__(self, report: QualityReport):
        self.report = report

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        data = self.report.to_json()
        if self.report.docs_dir and Path(self.report.docs_dir).is_dir():
            shutil.copytree(self.report.docs_dir, directory / "data_docs", dirs_exist_ok=True)
            data["docs_dir"] = "data_docs"
        (directory / "report.json").write_text(json.dumps(data, indent=2, default=str))

    @staticmethod
    def load(directory: Path) -> QualityReport:
        data = json.loads((directory / "report.json").read_text())
        if data.get("docs_dir"):
            data["docs_dir"] = str(directory / data["docs_dir"])
        return QualityReport.from_json(data)


class QualityReportMaterializer(_FolderMaterializer, BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (QualityReport,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def save(self, data: QualityReport) -> None:
        _FolderMaterializer.save(self, _QualityFolder(data))

    def load(self, data_type: Type[Any]) -> Any:
        return _QualityFolder.load(self._local_copy())


    def save_visualizations(self, data: QualityReport) -> Dict[str, VisualizationType]:
        return {self._write("quality.html", quality_html(data)): VisualizationType.HTML}

    def extract_metadata(self, data: QualityReport) -> Dict[str, Any]:
        return {"success": bool(data.success), "expectations": len(data.results), "failed": len(data.failures())}


class EntityFeaturesMaterializer(_FolderMaterializer, BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (EntityFeatures,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def extract_metadata(self, data: EntityFeatures) -> Dict[str, Any]:
        return {"items": len(data.item_ids), "users": len(data.user_ids), "dim": int(data.item_embeddings.shape[1]),
                "embedder": data.embedder}

    def save_visualizations(self, data: EntityFeatures) -> Dict[str, VisualizationType]:
        rows = [(i, t) for i, t in list(zip(data.item_ids, data.item_texts))[:15]]
        return {self._write("features.html", _table_html("Item texts (first 15)", rows)): VisualizationType.HTML}


class IndexBundleMaterializer(_FolderMaterializer, BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (IndexBundle,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save_visualizations(self, data: IndexBundle) -> Dict[str, VisualizationType]:
        out: Dict[str, VisualizationType] = {}
        if data.usage_png:
            uri = os.path.join(self.uri, "code_usage.png")
            with fileio.open(uri, "wb") as f:
                f.write(data.usage_png)
            out[uri] = VisualizationType.IMAGE
        sample = data.items.to_frame().head(20).to_html(index=False)
        page = _table_html("SID index", list(data.report.items())).replace("</body>", f"<h4>first 20 SIDs</h4>{sample}</body>")
        out[self._write("index.html", page)] = VisualizationType.HTML
        return out

    def extract_metadata(self, data: IndexBundle) -> Dict[str, Any]:
        return {k.replace("/", "_"): v for k, v in data.report.items()}


class InstructionSetMaterializer(_FolderMaterializer, BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (InstructionSet,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save_visualizations(self, data: InstructionSet) -> Dict[str, VisualizationType]:
        sample = data.rows.groupby(["split", "task"], sort=True).head(3)[["split", "task", "prompt", "target"]]
        return {self._write("instructions.html", f"<html><body>{sample.to_html(index=False)}</body></html>"): VisualizationType.HTML}

    def extract_metadata(self, data: InstructionSet) -> Dict[str, Any]:
        return {k.replace("/", "_"): v for k, v in data.counts().items()}


class TrainedRecommenderMaterializer(_FolderMaterializer, BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (TrainedRecommender,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def extract_metadata(self, data: TrainedRecommender) -> Dict[str, Any]:
        return {k.replace("/", "_"): v for k, v in data.meta.get("train", {}).items()}


class EvalReportMaterializer(_FolderMaterializer, BaseMaterializer):
    ASSOCIATED_TYPES: ClassVar[Tuple[Type[Any], ...]] = (EvalReport,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def save_visualizations(self, data: EvalReport) -> Dict[str, VisualizationType]:
        lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                                                      for k, v in sorted(data.metrics.items())]
        uri = self._write("metrics.md", "\n".join(lines))
        return {uri: VisualizationType.MARKDOWN}

    def extract_metadata(self, data: EvalReport) -> Dict[str, Any]:
        return {k.replace("/", "_"): v for k, v in data.metrics.items() if "recall_at_10" in k or "ndcg_at_10" in k or "invalid" in k}
