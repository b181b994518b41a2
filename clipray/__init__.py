"""clipray: train and serve video-text retrieval models (CLIP4Clip, UniPT, clip editing) on Ray.

Importing clipray has no side effects and loads no heavy library; the model registry functions
import torch/open_clip on first use.
"""

__version__ = "0.1.0"


def create_model(name: str, **overrides):
    """Build a registered model by name (see `list_models()`)."""
    from clipray.models import create_model as _create

    return _create(name, **overrides)


def list_models() -> list[str]:
    from clipray.models import list_models as _list

    return _list()
