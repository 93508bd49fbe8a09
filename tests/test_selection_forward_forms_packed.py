"""The selection forward's key_split + prefetch form (the default for dsa_v32 / dsa_block) on the packed (VARLEN)
and chunked-prefill (PREFILL) paths; tests/test_kernel_variants.py runs every form on batched calls."""

import specgen
from specgen.model.spec import load_spec, replace
from specgen.testing.prefill import check_chunked_prefill
from specgen.testing.varlen import check_forward_varlen

FWD_GQA = replace(load_spec("specs/dsa_small.yaml"), name="dsa_fwdvar_gqa", dtype="fp32",
                  **{"selection.top_k": 24})


def test_key_split_prefetch_packed_and_prefill(monkeypatch):
    form = (1, 1)
    spec = FWD_GQA
    mod = specgen.load(spec)
    base = dict(mod.CONFIGS["default"]["selection"])
    monkeypatch.setitem(mod.CONFIGS["default"], "selection",
                        {**base, "block_n": 16, "key_split": form[0], "prefetch": form[1]})
    check_forward_varlen(mod, spec, [41, 0, 3, 30])
    check_chunked_prefill(mod, spec, [[1, 0, 9], [20, 17, 0], [13, 1, 30]], packed=True)
