import json

import torch

from pgolf import checkpoint, codes, gptq, quantize
from conftest import make_data, run_stage, tiny_params


def test_calibrate_stage_quantizes_every_matrix_without_validation_data(tmp_path, fineweb):
    root = make_data(tmp_path, fineweb)
    p = tiny_params()
    p["quant"].update(calib_seqs=8, seq_len=32, bits={"attn": 4, "mlp": 5, "embed": 6})
    assert run_stage("train", root, p).returncode == 0
    (root / "data/shards/fineweb_val_000000.bin").unlink()  # calibration must never need it
    result = run_stage("calibrate", root, p)
    assert result.returncode == 0, result.stderr
    # Both halves report their rate; the stage's summary gives one duration and the Hessians' share of it.
    assert "calibrate: hessians: 8 seqs in " in result.stderr and "calibrate: quantize: 13 tensors in " in result.stderr
    assert " 0 tensors/s" not in result.stderr and "s of it Hessians)" in result.stdout
    tensors, meta = checkpoint.read_safetensors(root / "artifacts/quant.safetensors")
    assert meta["calibration"]["split"] == "train"
    float_model, _ = checkpoint.load_model(root / "artifacts/model.safetensors")
    matrices = [n for n, v in float_model.state_dict().items() if quantize.tensor_class(n)]
    assert sorted(meta["tensors"]) == sorted(matrices)
    for name, info in meta["tensors"].items():
        bits = {"attn": 4, "mlp": 5, "embed": 6}[info["class"]]
        assert info["bits"] == bits and info["method"] == "gptq"
        assert tensors[f"{name}.codes"].dtype == torch.int8 and tensors[f"{name}.codes"].abs().max() <= gptq.qmax(bits)
    assert tensors["blocks.0.attn.q_gain"].dtype == torch.float32  # control tensors stay float
    q_model = codes.model_from_tensors(tensors, meta)
    w = float_model.state_dict()["blocks.0.mlp.fc.weight"]
    assert (q_model.state_dict()["blocks.0.mlp.fc.weight"] - w).abs().max() < w.abs().max() / 8
    m = json.loads((root / "metrics/quant.json").read_text())
    assert m["method"] == "gptq" and {k for k in m if k.startswith("h_error_")} == {"h_error_attn", "h_error_mlp", "h_error_embed"}
    assert all(not isinstance(v, (dict, list)) for v in m.values())  # headline figures only; per tensor in reports/details
    assert set(json.loads((root / "reports/details/quant.json").read_text())["tensors"]) == set(matrices)


def test_tied_embedding_gets_one_hessian_per_row(tmp_path, fineweb):
    import dataclasses

    from pgolf import params
    from pgolf.model import GPT
    from pgolf.model import ModelParams

    model_p = params.section(tiny_params(), "model", ModelParams)
    torch.manual_seed(0)
    tokens = torch.randint(0, 1024, (4, 17)).numpy()
    model = GPT(model_p)
    tied = quantize.collect_hessians(model, tokens[:, :-1], tokens[:, 1:])
    untied = quantize.collect_hessians(GPT(dataclasses.replace(model_p, tie_embeddings=False)), tokens[:, :-1], tokens[:, 1:])
    H = tied["tok_emb.weight"]
    assert H.shape == (1024, 32, 32) and "lm_head.weight" not in tied
    assert torch.allclose(H, H.transpose(1, 2)) and (torch.linalg.eigvalsh(H) > -1e-9).all()  # per-row PSD
    assert all(p.grad is None for p in model.parameters())  # calibration leaves no gradients behind
    assert "lm_head.weight" in untied and "tok_emb.weight" not in untied  # the input embedding is rounded


def test_two_processes_calibrate_like_one(tmp_path, fineweb):
    roots = [make_data(tmp_path / name, fineweb) for name in ("one", "two")]
    p = tiny_params()
    p["quant"].update(calib_seqs=8, seq_len=32)
    for root, nproc in zip(roots, ("1", "2")):
        assert run_stage("train", root, p).returncode == 0
        result = run_stage("calibrate", root, p, PGOLF_NPROC=nproc, OMP_NUM_THREADS="1")
        assert result.returncode == 0, result.stderr
    (a, _), (b, _) = (checkpoint.read_safetensors(r / "artifacts/quant.safetensors") for r in roots)
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".codes"):  # Hessians summed in another order may flip a rare rounding tie
            assert (a[name] == b[name]).float().mean() > 0.99, name
        else:
            assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-3), name
