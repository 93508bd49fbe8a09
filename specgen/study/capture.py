"""Record what a Hugging Face causal LM's attention layers see, for a sweep's `file:` regime.

What is captured, per attention layer (shapes [B, T, H, D], float32, written by `specgen.study.capture_format.save`):

* ``q``, ``k``: the outputs of the module's ``q_proj`` / ``k_proj`` (or of ``q_norm`` / ``k_norm`` where the model
  normalises heads before RoPE, as Qwen3 does), reshaped to heads, with the model's own ``apply_rotary_pos_emb``
  applied using the ``position_embeddings`` (cos, sin) the decoder layer passes to the attention module: exactly the
  tensors the model's attention softmax multiplies, before its scale;
* ``v``: the output of ``v_proj``, reshaped to heads;
* ``hidden``: the attention module's input (the residual stream after the layer's input norm), what a DSA
  indexer's queries and keys are computed from;
* metadata: the model's softmax scale (``module.scaling``), model name, the layers, T and how tokens were made.

Everything is read through forward hooks (removed afterwards): the model's code and weights are untouched. Before
saving, each layer's capture is checked against the model itself: causal attention over the captured q/k/v (with
the model's scale, each kv head serving its group of query heads) must reproduce the input of ``o_proj`` for the
last queries; a model whose attention differs from that (a sliding window, logit soft-capping, no RoPE through
``position_embeddings``) fails with the reason instead of writing a capture that a sweep would misread.

Supported: attention modules with ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` that receive ``position_embeddings``
(Llama, Mistral, Qwen2/3, and most recent decoder-only models in transformers).

Python::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from specgen.study.capture import capture_text
    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B", torch_dtype="float32")
    tok = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B")
    capture_text(model, "corpus.txt", seqlen=2048, batch=2, tokenizer=tok, out="bench/captures/qwen.safetensors")

Command line: ``specgen capture MODEL --text FILE --seqlen T --out PATH`` (docs/sweeps.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .capture_format import CaptureError, save


def attention_modules(model) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, attention module) for every module with q/k/v/o projections, in model order."""
    found = [m for m in model.modules() if all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    if not found:
        raise CaptureError(f"{type(model).__name__}: no attention module with q_proj, k_proj, v_proj and o_proj; "
                           f"specgen capture supports Llama-style attention (Llama, Mistral, Qwen2/3, ...)")
    return [(int(getattr(m, "layer_idx", i) if getattr(m, "layer_idx", None) is not None else i), m)
            for i, m in enumerate(found)]


def _rope(module):
    """The model's own rotary function (the one its attention forward calls)."""
    fn = getattr(module, "rotary_fn", None) or getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb",
                                                       None)
    if fn is None:
        raise CaptureError(f"{type(module).__name__}: its module defines no apply_rotary_pos_emb; this model's RoPE "
                           f"cannot be reproduced by the capture hooks")
    return fn


def _heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, T, H*D] or [B, T, H, D] -> [B, T, H, D]."""
    return t if t.dim() == 4 else t.reshape(*t.shape[:2], -1, head_dim)


def capture(model, input_ids: torch.Tensor, layers: list[int] | None = None, *, verify: bool = True,
            verify_queries: int = 128) -> tuple[dict[int, dict[str, torch.Tensor]], dict]:
    """Run `model` once on `input_ids` [B, T] and return ({layer: {"q", "k", "v", "hidden"}}, meta), tensors
    [B, T, H, D] ([B, T, D_model] for hidden) in float32 on the CPU. `layers`: which (default all)."""
    modules = attention_modules(model)
    known = [i for i, _ in modules]
    chosen = known if layers is None else list(layers)
    bad = [i for i in chosen if i not in known]
    if bad:
        raise CaptureError(f"--layers {bad}: the model has attention layers {known[0]}..{known[-1]}")
    if input_ids.dim() != 2:
        raise CaptureError(f"input_ids must be [batch, seqlen], got {list(input_ids.shape)}")
    seen: dict[int, dict] = {i: {} for i in chosen}
    handles = []

    def keep(i, name):
        def hook(mod, args, out):
            seen[i][name] = (out[0] if isinstance(out, tuple) else out).detach()
        return hook

    def pre_attention(i):
        def hook(mod, args, kwargs):
            seen[i]["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()
            pe = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            seen[i]["rope"] = pe
        return hook

    def pre_output(i):
        def hook(mod, args):
            seen[i]["o_in"] = args[0].detach()
        return hook

    by_index = dict(modules)
    try:
        for i in chosen:
            m = by_index[i]
            handles.append(m.register_forward_pre_hook(pre_attention(i), with_kwargs=True))
            q_src = m.q_norm if hasattr(m, "q_norm") else m.q_proj      # Qwen3 normalises heads before RoPE
            k_src = m.k_norm if hasattr(m, "k_norm") else m.k_proj
            handles += [q_src.register_forward_hook(keep(i, "q")), k_src.register_forward_hook(keep(i, "k")),
                        m.v_proj.register_forward_hook(keep(i, "v")),
                        m.o_proj.register_forward_pre_hook(pre_output(i))]
        with torch.no_grad():
            model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    out, scales = {}, {}
    for i in chosen:
        m, s = by_index[i], seen[i]
        if s.get("rope") is None:
            raise CaptureError(f"layer {i}: the attention module got no position_embeddings (cos, sin); this model "
                               f"applies RoPE elsewhere and is not supported by the capture hooks")
        D = int(getattr(m, "head_dim", 0) or s["q"].shape[-1])
        q, k, v = (_heads(s[n], D) for n in ("q", "k", "v"))
        cos, sin = s["rope"]
        qr, kr = _rope(m)(q.transpose(1, 2), k.transpose(1, 2), cos, sin)      # the model's [B, H, T, D] layout
        q, k = qr.transpose(1, 2), kr.transpose(1, 2)
        scale = float(getattr(m, "scaling", D ** -0.5))
        scales[i] = scale
        layer = {"q": q.float().cpu().contiguous(), "k": k.float().cpu().contiguous(),
                 "v": v.float().cpu().contiguous(), "hidden": s["hidden"].float().cpu().contiguous()}
        if verify:
            _verify(i, layer, s["o_in"].float().cpu(), scale, verify_queries)
        out[i] = layer
    if len(set(scales.values())) > 1:
        raise CaptureError(f"layers use different softmax scales {scales}; capture them separately (--layers)")
    B, T = input_ids.shape
    meta = {"scale": next(iter(scales.values())), "model": getattr(model, "name_or_path", "") or
            type(model).__name__, "batch": B, "seqlen": T,
            "what": "q, k after the model's RoPE; v; hidden = the attention module's input (after the input norm)"}
    return out, meta


def _verify(i: int, layer: dict, o_in: torch.Tensor, scale: float, n: int) -> None:
    """Causal attention over the captured q/k/v must give the model's own attention output (o_proj's input) for the
    last `n` queries: the capture is what the model attends with."""
    q, k, v = (layer[x].double() for x in ("q", "k", "v"))
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    rows = torch.arange(max(0, T - n), T)
    kk = k.repeat_interleave(Hq // Hkv, dim=2)
    vv = v.repeat_interleave(Hq // Hkv, dim=2)
    logits = torch.einsum("bthd,bshd->bhts", q[:, rows], kk) * scale
    logits = logits.masked_fill(torch.arange(T)[None, :] > rows[:, None], float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", torch.softmax(logits, -1), vv).reshape(B, len(rows), -1)
    ref = o_in[:, rows].double()
    err = float((o - ref).norm() / ref.norm().clamp_min(1e-30))
    if err > 1e-3:
        raise CaptureError(f"layer {i}: causal attention over the captured q/k/v differs from the model's own "
                           f"attention output (relative error {err:.2e}): this layer's attention is not plain causal "
                           f"softmax attention (a sliding window, soft-capping, ALiBi?); a sweep would misread it. "
                           f"Capture other layers (--layers) or pass --no-verify to keep it anyway")


def text_ids(text: str, seqlen: int, batch: int, *, tokenizer=None, vocab_size: int | None = None) -> torch.Tensor:
    """[batch, seqlen] token ids from consecutive chunks of `text`: with the model's tokenizer (each chunk starts with
    its BOS token when it has one), or without one byte-level (UTF-8 bytes, modulo `vocab_size`: for tests and
    randomly initialised models only; a trained model needs its own tokenizer)."""
    if tokenizer is not None:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = getattr(tokenizer, "bos_token_id", None)
        body = seqlen - (bos is not None)
    else:
        ids = [b % (vocab_size or 256) for b in text.encode("utf-8")]
        bos, body = None, seqlen
    need = body * batch
    if len(ids) < need:
        raise CaptureError(f"the text has {len(ids)} tokens; --seqlen {seqlen} x --batch {batch} needs {need}: "
                           f"give a longer text or lower --seqlen / --batch")
    rows = [([bos] if bos is not None else []) + ids[b * body:(b + 1) * body] for b in range(batch)]
    return torch.tensor(rows, dtype=torch.long)


def capture_text(model, text_path: str | Path, *, seqlen: int, batch: int = 2, out: str | Path, tokenizer=None,
                 layers: list[int] | None = None, verify: bool = True) -> Path:
    """Tokenise a text file (see `text_ids`), capture the model's attention layers on it, and save the file."""
    text = Path(text_path).read_text(encoding="utf-8")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    ids = text_ids(text, seqlen, batch, tokenizer=tokenizer, vocab_size=vocab)
    layers_out, meta = capture(model, ids, layers, verify=verify)
    meta.update({"text": Path(text_path).name,
                 "tokens": "the model's tokenizer" if tokenizer is not None else "UTF-8 bytes (no tokenizer)"})
    return save(out, layers_out, meta)


def load_model(name: str, *, random_init: bool = False, seed: int = 0, dtype: str = "float32", device: str = "cpu"):
    """A causal LM from a Hub id or a local folder; with `random_init`, built from its config.json alone with random
    weights (seeded: the same model every time; no weights are downloaded)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise CaptureError("specgen capture needs transformers (pip install -e '.[study]')") from None
    torch_dtype = getattr(torch, dtype)
    try:
        if random_init:
            config = AutoConfig.from_pretrained(name)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise CaptureError(f"{name}: cannot load a causal LM ({(str(exc).splitlines() or [''])[0][:200]}); give a "
                           f"local folder with config.json (and weights, or --random-init), or a Hub id with network "
                           f"access") from None
    return model.to(device).eval()


def main(args) -> Path:
    """`specgen capture` (argparse namespace from specgen.cli)."""
    model = load_model(args.model, random_init=args.random_init, seed=args.seed, dtype=args.dtype,
                       device=args.device)
    tokenizer = None
    if not args.byte_tokens:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as exc:
            raise CaptureError(f"{args.model}: no tokenizer ({(str(exc).splitlines() or [''])[0][:200]}); a trained "
                               f"model needs its own, a randomly initialised one can use --byte-tokens") from None
    return capture_text(model, args.text, seqlen=args.seqlen, batch=args.batch, out=args.out, tokenizer=tokenizer,
                        layers=args.layers, verify=not args.no_verify)


__all__ = ["attention_modules", "capture", "capture_text", "load_model", "text_ids"]
