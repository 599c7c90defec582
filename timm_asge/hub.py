"""Save ASGE models in timm's Hugging Face Hub format (``config.json`` + ``model.safetensors``)."""
from pathlib import Path
from typing import Optional, Sequence, Union

from timm.models import save_for_hf

from .fileio import atomic_dir
from .models.asge_cnn import AsgeCnn

__all__ = ['save_pretrained']


def save_pretrained(
        model: AsgeCnn,
        directory: Union[str, Path],
        label_names: Optional[Sequence[str]] = None,
) -> Path:
    """Write ``model`` to ``directory`` in timm's Hub layout, atomically (the folder appears complete or not at all).

    ``config.json`` carries every architecture option (``model.architecture_args()``: widths, down-sampling,
    pooling, grid exponent, prediction strategy and chosen block), so ``timm.create_model('local-dir:<directory>',
    pretrained=True)`` or ``'hf-hub:<org>/<name>'`` rebuilds the same network. Weights are safetensors only.
    """
    model_config = {'label_names': list(label_names)} if label_names else None
    with atomic_dir(directory) as tmp:
        save_for_hf(model, tmp, model_config=model_config, model_args=model.architecture_args(), safe_serialization=True)
    return Path(directory)
