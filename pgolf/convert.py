"""Import a record's float weights as a pgolf checkpoint, so every later stage runs on the record's model.

python -m pgolf.convert SRC OUT --params PROFILE

SRC is a state dict as a record saves it (`final_model.pt`, read with torch.load(weights_only=True), or
.safetensors), in the record's own tensor names: PR #1394's per-layer matrices, or PR #1855's banks
(qo_bank = every layer's q then every layer's output projection, kv_bank = k then v, mlp_up_bank,
mlp_down_bank). PROFILE is a params file whose `model` section describes the same network
(profiles/record-1394.yaml, profiles/record-1855.yaml). Every tensor must be there with its shape and
nothing else may be; otherwise one error names the first bad tensor and OUT is not written. OUT is a file:
an existing folder there, or a parent that is not a folder, is refused before SRC is read.
"""
from __future__ import annotations

import argparse
import pickle  # only for its exception: weights_only loading refuses code, with this error
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pgolf import checkpoint, params
from pgolf.errors import InputError
from pgolf.files import check_file_output, sha256_file
from pgolf.model import GPT, ModelParams

# The record's name -> ours, where they differ (the matrices and per-block scalars share the baseline's names).
RENAMES = {
    "parallel_resid_lambdas": "lane_resid",
    "parallel_post_lambdas": "lane_post",
    "smear_gate.weight": "smear.gate.weight",
    "smear_lambda": "smear.lam",
}
BLOCK_RENAMES = {"attn.attn_gate_w": "attn.gate"}
# Each bank's layer i (first half) and layer layers + i (second half), as PR #1855 stacks them.
BANKS = {
    "qo_bank": ("attn.c_q.weight", "attn.proj.weight"),
    "kv_bank": ("attn.c_k.weight", "attn.c_v.weight"),
    "mlp_up_bank": ("mlp.fc.weight", None),
    "mlp_down_bank": ("mlp.proj.weight", None),
}
MAX_FILE_BYTES = 2 << 30  # a record's float weights are ~150 MB


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from .pt (no pickle code runs: weights_only) or .safetensors; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise InputError(f"{path}: {path.stat().st_size:,} bytes; a record's weights are far smaller (limit {MAX_FILE_BYTES:,})")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable state dict ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(f"{path}: expected a flat state dict of named tensors (as the record's torch.save(model.state_dict()))")
    return state


def record_name(ours: str) -> str:
    """The name our tensor has in an unbanked record state dict."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", ours)
    if m:
        back = {v: k for k, v in BLOCK_RENAMES.items()}
        return f"blocks.{m.group(1)}.{back.get(m.group(2), m.group(2))}"
    return {v: k for k, v in RENAMES.items()}.get(ours, ours)


def unbank(state: dict[str, torch.Tensor], layers: int, source: str = "state dict") -> dict[str, torch.Tensor]:
    """PR #1855's stacked banks as per-layer matrices in the record's unbanked names; other tensors unchanged."""
    flat = {}
    for key, value in state.items():
        if key not in BANKS:
            flat[key] = value
            continue
        first, second = BANKS[key]
        want = 2 * layers if second else layers
        if value.ndim != 3 or value.shape[0] != want:
            raise InputError(f"{source}: {key}: shape {list(value.shape)}; a bank of {want} matrices for {layers} layers was expected")
        for i in range(layers):
            flat[f"blocks.{i}.{first}"] = value[i]
            if second:
                flat[f"blocks.{i}.{second}"] = value[layers + i]
    return flat


def to_pgolf(state: dict[str, torch.Tensor], p: ModelParams, source: str = "state dict") -> dict[str, torch.Tensor]:
    """The record's tensors in our names as float32; one InputError names the first missing, mis-shaped or extra one."""
    state = unbank(state, p.layers, source)
    with torch.device("meta"):
        expected = GPT(p).state_dict()
    names = {ours: record_name(ours) for ours in expected}
    out = {}
    for ours, theirs in names.items():
        if theirs not in state:
            raise InputError(f"{source}: tensor {theirs} is missing; the profile's model needs it (shape {list(expected[ours].shape)})")
        t = state[theirs]
        if tuple(t.shape) != tuple(expected[ours].shape) or not t.is_floating_point():
            raise InputError(f"{source}: tensor {theirs} is {t.dtype} {list(t.shape)}; the profile's model needs float {list(expected[ours].shape)}")
        out[ours] = t.detach().to(torch.float32).contiguous()
    extra = [k for k in state if k not in set(names.values())]
    if extra:
        raise InputError(f"{source}: tensor {extra[0]} is not part of the profile's model ({len(extra)} extra); check the profile")
    return out


def imported_model(src: Path, p: ModelParams) -> tuple[GPT, dict]:
    """The network of model params `p` holding SRC's weights, and what to record about SRC."""
    tensors = to_pgolf(read_state_dict(src), p, str(src))
    model = GPT(p)
    model.load_state_dict(tensors, strict=True)
    return model, {"file": Path(src).name, "sha256": sha256_file(Path(src))}


def convert(src: Path, out: Path, p: ModelParams) -> GPT:
    """Read SRC, check it against the model params, write OUT as a pgolf checkpoint (whole, or not at all)."""
    check_file_output(out)
    model, source = imported_model(src, p)
    checkpoint.save_model(out, model, {"step": 0, "imported": source})
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pgolf.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="the record's state dict (.pt or .safetensors)")
    parser.add_argument("out", type=Path, help="the pgolf checkpoint to write (.safetensors)")
    parser.add_argument("--params", type=Path, required=True, help="a params file whose model section is the record's (profiles/record-*.yaml)")
    args = parser.parse_args(argv)
    p = params.section(params.load(args.params), "model", ModelParams, args.params)
    model = convert(args.src, args.out, p)
    n = sum(t.numel() for t in model.parameters())
    print(f"convert: {args.src} -> {args.out}: {n:,} parameters, {len(model.state_dict())} tensors")


if __name__ == "__main__":
    from pgolf.stage import run_stage

    run_stage(main, "convert")
