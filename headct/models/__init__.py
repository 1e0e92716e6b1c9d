"""Encoders, pre-training models and model directories.

Import-light on purpose: this package imports torch (and safetensors for model directories) but never
pydantic, monai or mlflow, so a GPU script can use it alone. Import the submodules you need:
`headct.models.vit`, `headct.models.mae`, `headct.models.model_dir`.
"""
