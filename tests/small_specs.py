"""Small mirror specs shared by the tier-2 test files (importable: tests/ is on sys.path under pytest)."""

from specgen.model.spec import load_spec, replace

# A miniature of specs/nsa_token.yaml (token selection ranked by an indexer) sized for the CPU interpreter.
TOKEN_SMALL = {"heads.q": 4, "heads.kv": 2, "head_dim.qk": 32, "head_dim.v": 32, "selection.top_k": 8,
               "indexer.heads": 2, "indexer.head_dim": 16, "compression.block": 8, "compression.stride": 4,
               "window.size": 16, "max_seqlen": 4096}


def small_token_spec(name: str, **changes):
    return replace(load_spec("specs/nsa_token.yaml"), name=name, **{**TOKEN_SMALL, **changes})
