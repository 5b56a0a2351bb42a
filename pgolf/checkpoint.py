"""Checkpoints in safetensors (no pickle: loading one cannot run code).

A model checkpoint holds the weights and, in its metadata, the `model` params that rebuild the
network. A resumable checkpoint adds the optimizer states and the loop's position.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open

from pgolf.errors import InputError
from pgolf.files import staged
from pgolf.model import GPT, ModelParams


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write tensors and JSON metadata whole (temporary file, then rename)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with staged(Path(path)) as (tmp,):
        save_file(tensors, str(tmp), metadata={"pgolf": json.dumps(meta)})


def read_meta(path: Path) -> dict:
    """The pgolf metadata of a safetensors file, without reading its tensors; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("pgolf", "null"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise InputError(f"{path}: no pgolf metadata (model params) in this safetensors file")
    return meta


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and pgolf metadata of a safetensors file written by pgolf; errors name the file."""
    meta = read_meta(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors checkpoint ({exc})") from None
    return tensors, meta


def save_model(path: Path, model: GPT, meta: dict | None = None) -> None:
    write_safetensors(path, model.state_dict(), {"model": dataclasses.asdict(model.p), **(meta or {})})


def load_model(path: Path) -> tuple[GPT, dict]:
    """Rebuild the network from a checkpoint's metadata and load its weights (strictly)."""
    tensors, meta = read_safetensors(path)
    model = GPT(ModelParams(**meta["model"]))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit the recorded model params ({exc})") from None
    return model, meta


def save_state(path: Path, model: GPT, optimizers: list[torch.optim.Optimizer], meta: dict, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Weights, optimizer states and `extra` tensors (the trainer's EMA) of a resumable checkpoint."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()} | {f"extra/{k}": v for k, v in (extra or {}).items()}
    for i, opt in enumerate(optimizers):
        for p_index, state in opt.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"opt{i}/{p_index}/{name}"] = torch.as_tensor(value)
    write_safetensors(path, tensors, {"model": dataclasses.asdict(model.p), **meta})


def load_state(path: Path, model: GPT, optimizers: list[torch.optim.Optimizer]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore weights and optimizer states saved by save_state; return the metadata and the extra tensors."""
    tensors, meta = read_safetensors(path)
    if meta["model"] != dataclasses.asdict(model.p):
        raise InputError(f"{path}: saved with other model params than params.yaml's; cannot resume")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise InputError(f"{path}: {len(bad)} non-finite tensors ({', '.join(bad[:3])}): not a state to resume; delete it")
    model.load_state_dict({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    for i, opt in enumerate(optimizers):
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith(f"opt{i}/"):
                _, p_index, name = key.split("/")
                state.setdefault(int(p_index), {})[name] = value
        sd = opt.state_dict()
        opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    return meta, {k[len("extra/") :]: v for k, v in tensors.items() if k.startswith("extra/")}
