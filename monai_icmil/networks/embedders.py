# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Patch embedders: timm backbones as pooled feature extractors that carry their own normalisation.

``create_embedder(name, weights=...)`` works like ``timm.create_model``: a registry name, optional weights (a local
``.pth``/``.pt``/``.safetensors`` file, one of our own fine-tuned checkpoints, or a hub id), and the returned
:class:`PatchEmbedder` knows its input normalisation, input size and output dimension.

The default, ``"resnet50_trunc"``, is timm's ResNet50 cut after ``layer3`` with global average pooling: the 1024-d
feature of ICMIL and CLAM. Any other timm model becomes a pooled feature extractor (``num_classes=0``).

Our own checkpoints are safetensors files whose metadata records the architecture, so
``create_embedder(weights="round_1/embedder.safetensors")`` rebuilds the fine-tuned embedder without a name.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn

from monai_icmil.utils import atomic_path, update_state_digest

__all__ = [
    "PatchEmbedder",
    "EmbedderWeightsError",
    "create_embedder",
    "load_state_dict_file",
    "model_folder_config",
    "TRUNCATED_MODELS",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "monai-icmil-embedder/1"

# name -> (timm architecture, stage after which the network is cut)
TRUNCATED_MODELS: dict[str, tuple[str, str]] = {
    "resnet50_trunc": ("resnet50", "layer3"),
    "resnet34_trunc": ("resnet34", "layer3"),
    "resnet18_trunc": ("resnet18", "layer3"),
}


class EmbedderWeightsError(RuntimeError):
    """Weights cannot be loaded: the message names the file (or hub id) and the first offending key."""


class _Truncated(nn.Module):
    """A timm ResNet run up to (and including) one stage, then globally average-pooled."""

    def __init__(self, arch: str, stage: str, **kwargs: Any):
        super().__init__()
        import timm

        net = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        names = [n for n, _ in net.named_children()]
        if stage not in names:
            raise ValueError(f"'{arch}' has no stage '{stage}' (children: {names})")
        keep = names[: names.index(stage) + 1]
        for name in names:
            if name not in keep:
                delattr(net, name)
        self.body = nn.Sequential()
        for name in keep:
            self.body.add_module(name, getattr(net, name))
        self.dropped_prefixes = tuple(f"{n}." for n in names if n not in keep)

        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint_sequential

            x = checkpoint_sequential(self.body, len(self.body), x, use_reentrant=False)
        else:
            x = self.body(x)
        return x.mean(dim=(2, 3))


class PatchEmbedder(nn.Module):
    """A patch feature extractor with its normalisation.

    ``forward`` takes ``uint8`` ``[N, 3, H, W]`` patches (0-255) or floats already in ``[0, 1]``, normalises them
    with the embedder's own mean/std and returns ``[N, out_dim]`` features.

    Args:
        backbone: the network mapping normalised images to pooled features.
        name: registry name (recorded in checkpoints and the fingerprint).
        mean, std: per-channel normalisation on ``[0, 1]`` inputs.
        input_size: the patch side the embedder is used at.
        config: extra constructor arguments (recorded in checkpoints).
    """

    def __init__(
        self,
        backbone: nn.Module,
        name: str,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        input_size: int = 224,
        config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.input_size = int(input_size)
        self.config = dict(config or {})
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._out_dim: int | None = None

    @property
    def out_dim(self) -> int:
        """Feature dimension (found once by a forward pass on a tiny input)."""
        if self._out_dim is None:
            p = next(self.backbone.parameters())
            was_training = self.training
            self.eval()
            with torch.no_grad():
                size = self.input_size
                self._out_dim = int(
                    self.backbone(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)).shape[-1]
                )
            self.train(was_training)
        return self._out_dim

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float patches -> normalised float patches."""
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass instead of storing them (less memory, more compute)."""
        if not hasattr(self.backbone, "set_grad_checkpointing"):
            raise ValueError(f"embedder '{self.name}' does not support gradient checkpointing")
        self.backbone.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ identity
    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_size": self.input_size,
            "mean": [round(float(v), 6) for v in self.mean.flatten()],
            "std": [round(float(v), 6) for v in self.std.flatten()],
            "config": self.config,
        }

    def fingerprint(self) -> str:
        """SHA-256 (24 hex) of the weights, name, input size and normalisation: the feature store's key."""
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        return update_state_digest(h, self.backbone.state_dict()).hexdigest()[:24]

    def save(self, path: str | os.PathLike, extra: Mapping[str, str] | None = None) -> Path:
        """Save as a safetensors checkpoint that :func:`create_embedder` loads by path alone (atomic)."""
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in self.backbone.state_dict().items()}
        meta = {"format": CHECKPOINT_FORMAT, "embedder": json.dumps(self.describe()), "fingerprint": self.fingerprint()}
        meta.update({k: str(v) for k, v in (extra or {}).items()})
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=meta)
        return path

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size}"


# ----------------------------------------------------------------------------------------------- weight loading


def _strip(state: dict[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def load_state_dict_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a state dict from ``.safetensors``, ``.pth``/``.pt``/``.bin`` (``weights_only`` loading).

    Nested checkpoints (``{"state_dict": ...}``, ``{"model": ...}``, ``{"embedder": ...}``) are unwrapped.

    Returns:
        ``(state_dict, metadata)``; metadata is the safetensors header metadata (empty for torch files).

    Raises:
        EmbedderWeightsError: missing or unreadable file, with the file named.
    """
    path = Path(path)
    if not path.is_file():
        raise EmbedderWeightsError(f"weights file '{path}' does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
            return state, meta
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise EmbedderWeightsError(
            f"cannot read weights file '{path}' ({type(e).__name__}: {e}). Expected a .safetensors file or a "
            "torch state dict (.pth/.pt) loadable with weights_only=True."
        ) from e
    for key in ("state_dict", "model", "embedder", "teacher", "student"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EmbedderWeightsError(f"weights file '{path}' does not hold a state dict of tensors.")
    return dict(obj), {}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, ignore_prefixes: Sequence[str]) -> None:
    """Strictly load ``state`` into ``model``, allowing only keys of parts the model drops (head, cut stages)."""
    state = _strip(state, ("module.", "_orig_mod."))
    target = model.state_dict()
    # accept checkpoints saved from the full model, from our wrapper (backbone.*) or with a body. prefix
    for prefix in ("backbone.", "body.", "model.", ""):
        candidate = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)} if prefix else state
        if any(k in target for k in candidate):
            state = candidate
            break
    if any(k.startswith("body.") for k in target) and not any(k.startswith("body.") for k in state):
        state = {f"body.{k}": v for k, v in state.items()}
        ignore_prefixes = tuple(f"body.{p}" for p in ignore_prefixes) + tuple(ignore_prefixes)
    for key, value in target.items():
        if key not in state:
            raise EmbedderWeightsError(
                f"weights '{source}' do not match the embedder: missing key '{key}' "
                f"({sum(k not in state for k in target)} missing in all). Is it a checkpoint of another architecture?"
            )
        if tuple(state[key].shape) != tuple(value.shape):
            raise EmbedderWeightsError(
                f"weights '{source}' do not match the embedder: key '{key}' has shape {tuple(state[key].shape)} "
                f"in the file but {tuple(value.shape)} in the model."
            )
    unexpected = [k for k in state if k not in target and not k.startswith(tuple(ignore_prefixes))]
    unexpected = [k for k in unexpected if not k.startswith(("fc.", "head.", "classifier.", "body.fc."))]
    if unexpected:
        warnings.warn(f"weights '{source}': {len(unexpected)} unused key(s), e.g. '{unexpected[0]}'.", stacklevel=3)
    model.load_state_dict({k: state[k] for k in target}, strict=True)


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        from huggingface_hub import constants

        if getattr(constants, "HF_HUB_OFFLINE", False):
            return False
        endpoint = urlparse(constants.ENDPOINT)
        host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except Exception:
        return False


def _hub_weights(hub_id: str) -> str:
    """Local path of a hub checkpoint: from the cache, or downloaded when the hub can be reached."""
    repo = hub_id[len("hf-hub:") :] if hub_id.startswith("hf-hub:") else hub_id
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError as e:
        raise EmbedderWeightsError(f"hub id '{hub_id}' needs huggingface_hub; or pass a local weights file.") from e
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str) and os.path.isfile(cached):
            return cached
    as_path = (
        ""
        if hub_id.startswith("hf-hub:")
        else f" If '{hub_id}' is meant as a path: no such file or folder from {os.getcwd()} (check it, or give it "
        "absolute)."
    )
    if not _hub_reachable():
        raise EmbedderWeightsError(
            f"cannot download weights '{hub_id}': the model hub is not reachable (offline?) and they are not in "
            "the local cache. Pass a local file instead, e.g. weights='/path/to/resnet50.safetensors' "
            f"(.safetensors, .pth or .pt).{as_path}"
        )
    last: Exception | None = None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return hf_hub_download(repo, filename)
        except Exception as e:  # try the next file name
            last = e
    raise EmbedderWeightsError(
        f"cannot download weights '{hub_id}' ({last}). Pass a local weights file instead.{as_path}"
    )


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.bin", "model.pth")


def _weights_in(path: str) -> str:
    """``path`` itself, or the weights file inside a model folder (as a hub snapshot or a copy of one lays it out)."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return str(folder / name)
    raise EmbedderWeightsError(f"no weights file ({', '.join(WEIGHT_FILES)}) in folder '{folder}'.")


def model_folder_config(weights: str | os.PathLike) -> dict[str, Any]:
    """The timm model config (``config.json``: ``architecture``, ``model_args``, ``pretrained_cfg``) beside a weights
    file or in its folder, as the hub publishes UNI-, Virchow- or Prov-GigaPath-style encoders; ``{}`` when there is
    none (or the file there is not a timm config, e.g. a ``transformers`` one).

    Raises:
        EmbedderWeightsError: a ``config.json`` that cannot be read, naming it.
    """
    path = Path(weights)
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise EmbedderWeightsError(f"cannot read the model config '{config}' ({type(e).__name__}: {e}).") from e
    return data if isinstance(data, dict) and "architecture" in data else {}


def _is_local(weights: str) -> bool:
    """A path (existing, or named like a weights file) rather than a hub id (``hf-hub:org/name`` or ``org/name``)."""
    if weights.startswith("hf-hub:"):
        return False
    if os.path.exists(weights) or weights.endswith((".pth", ".pt", ".bin", ".safetensors")):
        return True
    return not (weights.count("/") == 1 and not weights.startswith((".", "/", "~")))


def create_embedder(
    name: str | None = "resnet50_trunc",
    weights: str | os.PathLike | None = None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> PatchEmbedder:
    """Build a patch embedder by name, with optional weights.

    Args:
        name: ``"resnet50_trunc"`` (default, 1024-d), ``"resnet18_trunc"``/``"resnet34_trunc"`` (256-d), or any
            timm model name (pooled features, ``num_classes=0``), e.g. ``"resnet18"`` (512-d) or
            ``"vit_small_patch16_224"``. ``None`` with an own checkpoint in ``weights`` takes the recorded name.
        weights: ``None`` (random init), a local file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``; our
            fine-tuned checkpoints included), a model folder (a hub snapshot copied by hand: ``config.json`` +
            ``model.safetensors`` or ``pytorch_model.bin``) or a hub id (``"hf-hub:timm/resnet50.a1_in1k"`` or
            ``"timm/resnet50.a1_in1k"``). Offline, a hub id that is not cached fails at once with a message that says
            to pass a file. A timm ``config.json`` beside the weights (or in the folder) gives the architecture (it
            replaces ``name``, with a warning when they differ), its ``model_args`` (e.g. ``dynamic_img_size``,
            ``init_values``, ``reg_tokens``; the call's ``kwargs`` win) and its normalisation and input size (the
            call's win).
        input_size: patch side used with the embedder (default: the model's pretrained config, else 224).
        mean, std: normalisation (default: the model's pretrained config, ImageNet for ResNets).
        kwargs: forwarded to ``timm.create_model`` (e.g. ``drop_path_rate``).

    Raises:
        EmbedderWeightsError: unreadable file, mismatched weights (names the file and the first bad key), or an
            unreachable hub.
    """
    import timm

    state, meta, source = None, {}, None
    if weights is not None:
        weights = str(weights)
        path = _weights_in(weights) if _is_local(weights) else _hub_weights(weights)
        source = weights
        state, meta = load_state_dict_file(path)
        if meta.get("format") != CHECKPOINT_FORMAT:  # the file's own description of architecture and normalisation
            name, kwargs, mean, std, input_size = _from_folder_config(path, source, name, kwargs, mean, std, input_size)
    if meta.get("format") == CHECKPOINT_FORMAT:
        recorded = json.loads(meta["embedder"])
        if name is not None and name != recorded["name"]:
            warnings.warn(
                f"'{source}' is a '{recorded['name']}' checkpoint; building that, not '{name}'.", stacklevel=2
            )
        name = recorded["name"]
        kwargs = {**recorded.get("config", {}), **kwargs}
        input_size = input_size or recorded["input_size"]
        mean = mean or recorded["mean"]
        std = std or recorded["std"]
    if name is None:
        raise ValueError("create_embedder: give a model `name` (or one of our own checkpoints as `weights`).")
    ignore: tuple[str, ...] = ()
    if name in TRUNCATED_MODELS:
        arch, stage = TRUNCATED_MODELS[name]
        backbone: nn.Module = _Truncated(arch, stage, **kwargs)
        ignore = backbone.dropped_prefixes
        cfg_model = arch
    else:
        try:
            backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except RuntimeError as e:
            raise ValueError(f"unknown embedder '{name}': not in timm's registry nor {list(TRUNCATED_MODELS)}.") from e
        cfg_model = name
    pcfg = _pretrained_cfg(cfg_model)
    mean = tuple(mean or pcfg.get("mean", IMAGENET_MEAN))
    std = tuple(std or pcfg.get("std", IMAGENET_STD))
    input_size = int(input_size or (pcfg.get("input_size") or (3, 224, 224))[-1])
    if state is not None:
        _load_into(backbone, state, source or "weights", ignore)
    return PatchEmbedder(backbone, name, mean, std, input_size, config=kwargs)


def _from_folder_config(
    path: str, source: str, name: str | None, kwargs: dict, mean: Any, std: Any, input_size: int | None
) -> tuple[str | None, dict, Any, Any, int | None]:
    """``(name, kwargs, mean, std, input_size)`` completed from the timm ``config.json`` beside ``path``
    (:func:`model_folder_config`): the call's values win, except the architecture, which the weights fix."""
    folder = model_folder_config(path)
    if not folder:
        return name, kwargs, mean, std, input_size
    if name is not None and name != folder["architecture"]:
        warnings.warn(
            f"'{source}' holds a '{folder['architecture']}' (its config.json); building that, not '{name}'.",
            stacklevel=3,
        )
    args = {k: v for k, v in dict(folder.get("model_args") or {}).items() if k != "num_classes"}
    pcfg = dict(folder.get("pretrained_cfg") or {})
    size = input_size or (pcfg.get("input_size") or [None])[-1] or args.get("img_size")
    return folder["architecture"], {**args, **kwargs}, mean or pcfg.get("mean"), std or pcfg.get("std"), size


def _pretrained_cfg(model_name: str) -> dict[str, Any]:
    """timm's pretrained config of a model (mean, std, input size), or ``{}``."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:
        return {}
    return cfg.to_dict() if cfg is not None else {}
