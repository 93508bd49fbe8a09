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
    # top_k 24 tokens in key tiles of 16: rows past t = 15 take a second, ragged trip (the prefetched one), rows
    # past t = 23 drop candidates. Packed: the 30-token sequence at row 3 (offset reads) has all three kinds of rows.
    check_forward_varlen(mod, spec, [3, 0, 30])
    # Rounds at qoff 0 and > 0, empty chunks, a chunk of one; the last round's rows reach t = 24 (sequence 0) and
    # t = 17 (sequence 2), past one key tile, after their earlier chunks.
    check_chunked_prefill(mod, spec, [[1, 0, 9], [20, 17, 0], [4, 1, 9]], packed=True)
