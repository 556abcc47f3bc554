"""sidrec: LLM-based generative recommendation with semantic IDs.

The library is pure Python/PyTorch/pandas and never imports ZenML; the ZenML
steps in `steps/` are thin wrappers around the functions here.
"""

__version__ = "0.1.0"
