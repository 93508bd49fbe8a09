"""`specgen capture` and captured activations as a sweep regime: a tiny randomly initialised Llama (built from a
config, nothing downloaded) is captured through forward hooks, the capture is checked against the model's own
attention, and a sweep measures it per layer and over all layers. CPU, a few seconds."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="specgen capture needs transformers (the study extra)")
pytest.importorskip("safetensors", reason="captures are written with safetensors (the study extra)")

from specgen.study import capture_format  # noqa: E402
from specgen.study import fidelity as F  # noqa: E402
from specgen.study.capture import capture, text_ids  # noqa: E402
from specgen.cli import main  # noqa: E402
from specgen.study.sweep import SweepError, read_records, run_sweep, sweep_from_mapping  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=512, initializer_range=0.15)


def tiny_llama(seed: int):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


def test_capture_is_what_the_models_attention_multiplies():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = tiny_llama(seed)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(seed))
    attn = model.model.layers[1].self_attn
    seen = {}
    hooks = [attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o_in", a[0].detach())),
             attn.k_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("k_proj", o.detach()))]
    try:
        layers, meta = capture(model, ids, [1])
    finally:
        for h in hooks:
            h.remove()
    assert all(not h for h in (attn._forward_hooks, attn.q_proj._forward_hooks))     # the capture's hooks are gone
    c = layers[1]
    assert c["q"].shape == (2, 48, 4, 16) and c["k"].shape == (2, 48, 2, 16) and c["hidden"].shape == (2, 48, 64)
    assert meta["scale"] == pytest.approx(16 ** -0.5)
    # After RoPE: position 0 is not rotated (cos 1, sin 0), later positions are.
    k_raw = seen["k_proj"].reshape(2, 48, 2, 16)
    assert torch.allclose(c["k"][:, 0], k_raw[:, 0], atol=1e-6)
    assert (c["k"][:, 1:] - k_raw[:, 1:]).abs().max() > 1e-3
    # Dense causal attention over the capture (each kv head serving 2 query heads) is the model's attention output.
    q, k, v = (c[n].double() for n in ("q", "k", "v"))
    kk, vv = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    logits = torch.einsum("bthd,bshd->bhts", q, kk) * meta["scale"]
    logits = logits.masked_fill(torch.ones(48, 48, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", logits.softmax(-1), vv).reshape(2, 48, 64)
    assert torch.allclose(o, seen["o_in"].double(), atol=1e-5)


def test_text_ids_are_consecutive_chunks_and_too_short_a_text_says_what_it_needs():
    ids = text_ids("abcdefgh", 3, 2, vocab_size=256)
    assert ids.tolist() == [[97, 98, 99], [100, 101, 102]]
    with pytest.raises(capture_format.CaptureError, match="needs 8"):
        text_ids("abc", 4, 2)


def test_capture_cli_then_sweep_per_layer_and_over_all_layers(tmp_path, capsys):
    transformers.LlamaConfig(**TINY).save_pretrained(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    text.write_text("".join(chr(32 + int(c)) for c in torch.randint(0, 90, (400,), generator=g)))
    assert main(["capture", str(tmp_path / "tiny"), "--random-init", "--byte-tokens", "--text", str(text),
                 "--seqlen", "96", "--batch", "2", "--out", str(tmp_path / "cap.safetensors")]) == 0
    assert "captured:" in capsys.readouterr().out
    # A model folder without a tokenizer and no --byte-tokens: one line naming the fix, exit 2.
    assert main(["capture", str(tmp_path / "tiny"), "--random-init", "--text", str(text), "--seqlen", "96",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--byte-tokens" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert capture_format.layers_of(tmp_path / "cap.safetensors") == [0, 1]
    x = F.load_captured("cap.safetensors#layer=1", base_dir=tmp_path)
    assert x.q.shape == (2, 96, 4, 16) and x.hidden.shape == (2, 96, 64) and x.meta["scale"] == 0.25
    with pytest.raises(capture_format.CaptureError, match="holds layers"):
        F.load_captured("cap.safetensors", base_dir=tmp_path)
    with pytest.raises(SweepError, match=r"holds layers \[0, 1\]"):        # said when the sweep file is read
        sweep_from_mapping({"name": "x", "base": {"family": "nsa"}, "axes": {"selection.block": [8]},
                            "regimes": ["file:cap.safetensors#layer=5"]}, path=tmp_path / "x.sweep.yaml")

    base = {"family": "nsa", "heads": {"q": 4, "kv": 2}, "head_dim": {"qk": 16, "v": 16}, "kv": "shared",
            "compression": {"block": 8, "stride": 4}, "selection": {"block": 8, "top_k": 4, "initial": 1, "local": 1},
            "window": {"size": 16}, "max_seqlen": 512}
    sweep = sweep_from_mapping({
        "name": "cap", "base": base,
        "axes": {"selection.granularity": ["block", "token"]}, "constraints": {"budget": {"tokens": 32}},
        "when": [{"if": {"selection.granularity": "token"}, "set": {"indexer": {"heads": 2, "head_dim": 16}}}],
        "regimes": ["file:cap.safetensors"], "fidelity": {"fit_steps": 30, "seeds": 2}},
        path=tmp_path / "cap.sweep.yaml")
    result = run_sweep(sweep, tmp_path / "out", build=False, log=lambda s: None)
    assert result["ran"] == 4 and result["errors"] == 0              # 2 variants x 2 layers
    recs = [r for r in read_records(tmp_path / "out" / "results.jsonl") if r["part"] == "fidelity"]
    assert {r["regime"] for r in recs} == {"file:cap.safetensors#layer=0", "file:cap.safetensors#layer=1"}
    token = [r for r in recs if r["label"].startswith("token")]
    assert all("hidden states" in d["how"] for r in token for d in r["fit"]["details"])   # indexer from h
    assert all(len(r["per_seed"]) == 2 and r["seqlen"] == 96 for r in recs)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Fidelity: file:cap.safetensors#layer=0, T = 96" in report
    assert "## Fidelity: file:cap.safetensors (all layers), T = 96" in report
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["fidelity"]
    overall = [r for r in rows if r["layer"] == "all" and r["label"].startswith("block")]
    layers = [r for r in rows if isinstance(r["layer"], int) and r["label"].startswith("block")]
    assert len(overall) == 1 and overall[0]["recall"] == pytest.approx(sum(r["recall"] for r in layers) / 2)
    assert len(layers[0]["recall_by_kv_head"]) == 2                                     # per kv head
    # A capture whose softmax scale differs from the spec's is refused with the fix.
    bad = sweep_from_mapping({"name": "cap2", "base": {**base, "scale": 0.5},
                              "axes": {"selection.block": [8]}, "regimes": ["file:cap.safetensors#layer=0"],
                              "fidelity": {"fit_steps": 0, "seeds": 1}}, path=tmp_path / "cap2.sweep.yaml")
    run_sweep(bad, tmp_path / "out2", build=False, log=lambda s: None)
    (err,) = [r for r in read_records(tmp_path / "out2" / "results.jsonl") if r["part"] == "fidelity"]
    assert err["status"] == "error" and "set `scale: 0.25`" in err["error"]


def test_a_torch_capture_with_one_layer_reads_as_before(tmp_path):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    layers = {3: {"q": torch.randn(1, 32, 4, 16, generator=g), "k": torch.randn(1, 32, 2, 16, generator=g),
                  "v": torch.randn(1, 32, 2, 16, generator=g)}}
    capture_format.save(tmp_path / "c.pt", layers, {"scale": 0.25})
    x = F.load_captured("c.pt", base_dir=tmp_path)
    assert torch.equal(x.k.float(), layers[3]["k"]) and x.hidden is None and x.meta["scale"] == 0.25
    with pytest.raises(capture_format.CaptureError, match="no layer 0"):
        F.load_captured("c.pt#layer=0", base_dir=tmp_path)
