"""HematoVision: white-blood-cell type classification (model code, free of Flask)."""

__version__ = "1.0.0"
