"""The block scorer's unmasked trips (select.j2 score_trip(masked=False)) in the default plan, on the packed
(VARLEN) and chunked-prefill (PREFILL: qoff > 0, paged) paths, with padded head rows (group 7: rows padded to 8)
and sequence lengths that are not multiples of the scorer tile. tests/test_forward_variants.py covers the unmasked
trips through the score_km / score_key32 variant modules in batched calls. (Kept to one case per path; the
selection attention runs block-outer, whose kernels the interpreter runs in a fraction of the query order's
per-token programs: the scorer is the same kernel in either loop order.)"""

import specgen
from specgen.compile.plan import make_plan
from specgen.model.spec import load_spec, replace
from specgen.testing.prefill import check_chunked_prefill
from specgen.testing.varlen import check_forward_varlen

SMALL = load_spec("specs/nsa_small.yaml")   # l=8 d=4 l'=16; a trip scores 64 pooled blocks = 256 tokens


def spec_of(group):
    hq, hkv = {3: (3, 1), 7: (7, 1)}[group]
    return replace(SMALL, name=f"nsa_rv_unmasked_g{group}", branches=["compression", "selection"], window=None,
                   max_seqlen=512, **{"heads.q": hq, "heads.kv": hkv, "head_dim.qk": 16, "head_dim.v": 16,
                                      "selection.loop_order": "kv"})


def first_unmasked_t_lo(spec):
    plan = make_plan(spec)
    assert plan.score_unmasked_trips
    c = spec.compression
    return c.block - 1 + (plan.score_bnc - 1) * c.stride


def test_packed_unmasked_trips():
    spec = spec_of(7)
    # The long sequence starts at packed row 13 and pooled block 2 (the first sequence's), so its unmasked trips read
    # at both offsets; its last two tiles of 8 positions (264, 272: 277 ends 5 rows into the second) take one.
    assert 264 >= first_unmasked_t_lo(spec) > 256
    check_forward_varlen(specgen.load(spec), spec, [13, 0, 277])


def test_prefill_unmasked_trips():
    spec = spec_of(7)
    # second round: queries at positions 270.. of a cache that already holds 270 tokens (qoff > 0; 13 queries, two
    # tiles, the second ragged) after a short sequence in the packed chunk (ragged packing, only masked trips)
    check_chunked_prefill(specgen.load(spec), spec, [[6, 270], [5, 13]], paged=True, packed=True)
