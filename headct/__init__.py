"""headct: a head-CT foundation-model toolkit (ingest, pre-train, evaluate 3D encoders).

Kept import-light: heavy modules (torch, monai, mlflow) are imported by the functions that need them.
"""

__version__ = "0.1.0"
