"""The records' quantization: SD clip, shared embedding Hessian, LQER, self-generated calibration."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from pgolf import checkpoint, codes, gptq, lqer, params, quantize
from pgolf.errors import InputError
from pgolf.lqer import LqerParams
from pgolf.model import BOS_ID, GPT, ModelParams
from pgolf.quantize import QuantParams
from conftest import run_stages, shards_params, tiny_params
from test_gptq import correlated_layer, output_error


@pytest.mark.parametrize("bits, k", [(4, 3.0), (6, 12.85), (7, 14.0)])
def test_sdclip_scale_is_k_standard_deviations_over_qmax(bits, k):
    X, W, H = correlated_layer(seed=6)
    W[3, 5] = 0.5  # an outlier: 0.5 is over k standard deviations of its row for k = 3
    for codes_, scale in (gptq.rtn(W, bits, H, sigmas=k), gptq.gptq(W, H, bits, sigmas=k)):
        assert torch.equal(scale, (k * W.double().std(1) / gptq.qmax(bits)).half())
        assert codes_.abs().max() <= gptq.qmax(bits)
        assert (codes_[3, 5] == gptq.qmax(bits)) == (k * W[3].std() < 0.5)  # clipped, never widened


@pytest.mark.parametrize("block_size, act_order", [(1, False), (16, True)])
def test_sdclip_gptq_blocked_equals_the_reference(block_size, act_order):
    X, W, H = correlated_layer(seed=7)
    fast = gptq.gptq(W, H, 5, block_size=block_size, act_order=act_order, sigmas=4.0)
    ref = gptq.gptq_reference(W, H, 5, act_order=act_order, sigmas=4.0)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
    assert output_error(X, W, *fast) < 0.6 * output_error(X, W, *gptq.rtn(W, 5, H, sigmas=4.0))


def test_group_quantization_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=g, dtype=torch.float64)
    for bits, groups in ((2, 1), (4, 8), (3, 64)):
        c, s = lqer.quantize_groups(x, bits, groups)
        flat, n = x.reshape(-1), x.numel() // groups
        for i in range(groups):
            part = flat[i * n : (i + 1) * n]
            scale = torch.tensor(float(part.abs().max()) / (2 ** (bits - 1) - 0.5)).half()
            ref = [max(-(2 ** (bits - 1)), min(2 ** (bits - 1) - 1, round(float(v) / float(scale)))) for v in part]
            assert s[i] == scale and c.reshape(-1)[i * n : (i + 1) * n].tolist() == ref
        assert torch.equal(codes.dequantize_groups(c, s), (c.double().reshape(groups, -1) * s.double()[:, None]).reshape(x.shape).float())


def test_lqer_corrects_the_largest_errors_and_the_loader_applies_it():
    g = torch.Generator().manual_seed(1)
    state = {f"m{i}": (1 + i) * torch.randn(32, 64, generator=g) for i in range(4)}
    tensors = {}
    for n, w in state.items():
        tensors[f"{n}.codes"], tensors[f"{n}.scale"] = gptq.rtn(w, 3)
    plain = {n: codes.weight(tensors, n) for n in state}
    p = LqerParams(rank=4, top_k=2, a_bits=2, b_bits=4, group=64)
    factors = lqer.correct(state, plain, p)
    assert sorted({k.rsplit(".", 1)[0] for k in factors}) == ["m2", "m3"]  # the largest ‖W - Ŵ‖: the widest weights
    assert factors["m3.lqer_a"].shape == (32, 4) and factors["m3.lqer_b"].shape == (4, 64) and factors["m3.lqer_b_scale"].shape == (4,)
    assert factors["m3.lqer_a"].min() >= -2 and factors["m3.lqer_a"].max() <= 1 and factors["m3.lqer_a_scale"].shape == (1,)
    tensors.update(factors)
    for n in ("m2", "m3"):
        fixed = codes.weight(tensors, n)
        assert torch.allclose(fixed, plain[n] + codes.dequantize_groups(factors[f"{n}.lqer_a"], factors[f"{n}.lqer_a_scale"])
                              @ codes.dequantize_groups(factors[f"{n}.lqer_b"], factors[f"{n}.lqer_b_scale"]))
        assert (state[n] - fixed).norm() < (state[n] - plain[n]).norm()
    assert torch.equal(codes.weight(tensors, "m0"), plain["m0"])
    assert lqer.correct(state, plain, dataclasses.replace(p, rank=0)) == {}
    odd = lqer.factors(torch.randn(8, 48, generator=g), dataclasses.replace(p, group=64))  # 64 does not divide a row of 48
    assert odd["lqer_b_scale"].shape == (4,)  # one scale per row


def _model(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(params.section(tiny_params(), "model", ModelParams), **changes)).eval()


def test_shared_embedding_hessian_is_the_head_inputs_gram_matrix():
    model = _model()
    tokens = torch.randint(0, 1024, (3, 17), generator=torch.Generator().manual_seed(2)).numpy()
    H = quantize.collect_hessians(model, tokens[:, :-1], tokens[:, 1:], embed_hessian="shared")["tok_emb.weight"]
    with torch.no_grad():
        x = model.hidden(torch.from_numpy(tokens[:, :-1])).reshape(-1, model.p.dim).double()
    assert H.shape == (32, 32) and torch.allclose(H, x.T @ x)


def test_per_row_hessians_are_refused_where_they_cannot_fit():
    q = params.section(tiny_params(), "quant", QuantParams)
    with pytest.raises(InputError, match=r"quant.embed_hessian is per_row, which needs 16.0 GiB .* use shared"):
        quantize.check_memory(q, 8192, 512, tied=True)
    quantize.check_memory(dataclasses.replace(q, embed_hessian="shared"), 8192, 512, tied=True)
    quantize.check_memory(q, 1024, 512, tied=True)  # 2 GiB: fits


def test_self_generated_calibration_is_seeded_and_starts_at_bos():
    model = _model()
    a, b, c = (quantize.sample(model, 5, 12, 1.0, seed, batch_seqs=2) for seed in (3, 3, 4))
    assert a.shape == (5, 13) and (a[:, 0] == BOS_ID).all() and a.max() < 1024
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # At a low temperature the samples follow the model's own greedy choices.
    cold = quantize.sample(model, 2, 6, 1e-4, 0)
    with torch.no_grad():
        greedy = model.logits(torch.from_numpy(cold[:, :-1])).argmax(-1).numpy()
    assert np.array_equal(cold[:, 1:], greedy)


def test_calibrate_with_the_records_settings_reads_no_data_and_packs_every_way(tmp_path, fineweb, lrzip):
    root = tmp_path / "run"
    root.mkdir()
    p = tiny_params(shards_params(fineweb, tmp_path / "src", 3000, 20000))
    p["eval"].update(seq_len=32, stride=16)
    p["verify"].update(positions=8)
    p["quant"].update(calib_seqs=4, seq_len=32, clip="sdclip", embed_hessian="shared", calibration="self_generated",
                      lqer={"rank": 2, "top_k": 3, "a_bits": 2, "b_bits": 4, "group": 16})
    run_stages(root, p, "tokenize", "train")
    for split in ("val", "train"):  # self-generated calibration needs no shard at all
        for f in (root / "data/shards").glob(f"fineweb_{split}_*.bin"):
            f.rename(f.with_suffix(".away"))
    run_stages(root, p, "calibrate")
    for f in (root / "data/shards").glob("*.away"):
        f.rename(f.with_suffix(".bin"))
    tensors, meta = checkpoint.read_safetensors(root / "artifacts/quant.safetensors")
    assert meta["calibration"] == {"split": "self_generated", "seed": p["seed"], "temperature": 1.0, "seqs": 4, "seq_len": 32}
    assert sum(info["lqer_rank"] == 2 for info in meta["tensors"].values()) == 3
    assert all(info["clip"].startswith("sdclip ") for info in meta["tensors"].values())
    m = json.loads((root / "metrics/quant.json").read_text())
    assert m["clip"] == "sdclip" and m["calibration"] == "self_generated" and m["lqer_tensors"] == 3
    sizes = {}
    for compressor in ("zstd", "brotli", "lrzip", "auto"):
        p["pack"]["compressor"] = compressor
        run_stages(root, p, "pack")
        blob = (root / "artifacts/model.pgolf").read_bytes()
        sizes[compressor] = len(blob)
        from pgolf import artifact
        back, _ = artifact.unpack(blob)
        assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors), compressor
        pm = json.loads((root / "metrics/pack.json").read_text())
        assert pm["weight_bytes"] == len(blob) and pm["unpack_seconds"] >= 0
    assert {k for k in pm if k.endswith("_bytes") and k.split("_")[0] in ("zstd", "brotli", "lrzip")} == {"zstd_bytes", "brotli_bytes", "lrzip_bytes"}
    assert sizes["auto"] == min(sizes["zstd"], sizes["brotli"], sizes["lrzip"]) == min(pm["zstd_bytes"], pm["brotli_bytes"], pm["lrzip_bytes"])
    model = artifact.load_model(root / "artifacts/model.pgolf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), codes.model_from_tensors(tensors, meta).state_dict().values()))
    p["pack"]["code"] = "compressed"
    run_stages(root, p, "pack", "score", "adapt", "rescore", "report")
    pm = json.loads((root / "metrics/pack.json").read_text())
    assert pm["code_bytes"] == pm["code_bytes_compressed"] < pm["code_bytes_raw"]
    report = json.loads((root / "metrics/report.json").read_text())
    assert report["artifact_bytes"] == pm["total_bytes"] and report["passed"] and report["rules_passed"] == report["rules"]
