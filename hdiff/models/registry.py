"""Which network class a config's ``[model] kind`` names.

Every trainable denoiser is a diffusers ``ModelMixin`` + ``ConfigMixin`` whose
``forward(x_t, alpha)`` returns ``log p(x0 | x_t)`` ``(B, v, *leaf_shape)`` and which exposes
``process`` and ``leaf_shape``; that is all the training loop and the sampler rely on. Built-in
classes are imported lazily, and tests or notebooks may :func:`register_model` their own.
"""

from __future__ import annotations

import importlib

#: kind -> {layout: "module:attribute"} of the class, imported on first use
_BUILTIN = {
    "tree_unet": {"sequence": "hdiff.models.tree_unet:TreeUNet", "image": "hdiff.models.tree_unet:TreeUNet"},
    "unet_baseline": {"sequence": "hdiff.models.baselines:UNet1DBaseline", "image": "hdiff.models.baselines:UNet2DBaseline"},
    "bp_unet": {"sequence": "hdiff.models.bp_unet:BPUNet", "image": "hdiff.models.bp_unet:BPUNet"},
}
_REGISTERED: dict[str, type] = {}

def register_model(kind: str, cls: type) -> None:
    """Make ``[model] kind = "<kind>"`` build ``cls`` (a ModelMixin with the denoiser interface)."""
    _REGISTERED[kind] = cls


def model_kinds() -> list[str]:
    """Every kind a config may name."""
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def model_class(kind: str, layout: str = "sequence") -> type:
    """The class for ``kind`` on leaves of ``layout`` (the diffusers baselines differ by layout).

    Raises:
        ValueError: naming ``model.kind`` when the kind is unknown or its class cannot be imported.
    """
    if kind in _REGISTERED:
        return _REGISTERED[kind]
    if kind not in _BUILTIN:
        raise ValueError(f"model.kind must be one of {model_kinds()}, got {kind!r}")
    spec = _BUILTIN[kind][layout]
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model.kind = {kind!r}: {spec} is not available ({e})") from e
