"""An empty batch (B = 0) with given indices through a block-outer (loop_order kv) spec's backward: a query chunk
with no work item returns empty gradients (a stray name in Backward.selection_kv once raised NameError there)."""

import torch

import specgen
from specgen import testing
from specgen.model.spec import load_spec, replace

KV = replace(load_spec("specs/dsa_small.yaml"), name="dsamem_kv", max_seqlen=256,
             **{"selection.granularity": "block", "selection.block": 16, "selection.top_k": 2,
                "selection.loop_order": "kv", "heads.q": 4, "heads.kv": 1, "head_dim.qk": 32, "head_dim.v": 16})


def test_empty_batch_with_given_indices_backward_block_outer():
    mod = specgen.load(KV)
    inputs, dout = testing._grad_inputs(mod, KV, 1, 9, testing.test_device(), testing.fresh_seed())
    x = {n: v[:0].clone().requires_grad_(n in testing.differentiable_inputs(KV)) for n, v in inputs.items()}
    # The given indices on the inputs' device (CUDA on a GPU machine): a CPU tensor would fail the device check.
    out = mod.dsa_attention(**x, indices=torch.zeros((0, 9, 1, 2), dtype=torch.int32, device=dout.device))
    out.backward(dout[:0])
    assert x["q"].grad.shape == x["q"].shape


def test_empty_batch_without_indices_selects_nothing():
    """B = 0 through the indexer (no given indices): empty output and gradients, not a division by zero in the
    workspace sizing."""
    mod = specgen.load(KV)
    inputs, dout = testing._grad_inputs(mod, KV, 1, 9, testing.test_device(), testing.fresh_seed())
    x = {n: v[:0].clone().requires_grad_(n in testing.differentiable_inputs(KV)) for n, v in inputs.items()}
    out, idx = mod.dsa_attention(**x, return_indices=True)
    assert out.shape[0] == 0 and idx.shape[0] == 0
    out.backward(dout[:0])
    assert x["q"].grad.shape == x["q"].shape
