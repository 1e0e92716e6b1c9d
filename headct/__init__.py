"""headct: a head-CT foundation-model toolkit (ingest, pre-train, evaluate 3D encoders).

Kept import-light: heavy modules (torch, monai, mlflow) are imported by the functions that need them.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `import headct` stays light, `headct.load_encoder` imports torch on use
    if name in ("load_encoder", "Encoder"):
        from headct import encoder

        return getattr(encoder, name)
    if name in ("load_classifier", "FindingClassifier"):
        from headct import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module 'headct' has no attribute {name!r}")
