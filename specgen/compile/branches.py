"""The attention branches, each declared once: what it reads, which kernels a module has for it, and which launch
configs are tuned for it. The plan, render, tuning, the footprint model (and the benchmarks' per-kernel profile,
through `kernel_names`) read this table instead of spelling the branch list out; the spec's choice of branches is
validated against the same names (specgen.model.spec.BRANCHES).

Which keys a query sees is the branch's visibility rule, one Jinja macro (`sees` in templates/kernels/common.j2)
shared by the forward, backward and decode kernels. The templates see this table as `branch_of` (a global of the
Jinja environment, templating.environment) and test what a branch is, `branch_of[kind].pooled` / `.gathered` /
`.windowed`, never its name; names appear there only as data (kernel names, config keys, gate channels).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.signature import SHORT as SIGNATURE_SHORT
from ..model.spec import BRANCHES as SPEC_BRANCHES, Spec


@dataclass(frozen=True)
class Branch:
    name: str
    short: str             # suffix of the branch's own k/v inputs under `kv: independent` (k_cmp, v_cmp)
    pooled: bool = False   # attends over the pooled compression keys/values (kc, vc; NC of them per sequence)
    gathered: bool = False  # attends over the keys the selection lists for each query (IDX), not a key range
    # Attends over the last `window.size` tokens up to the query (t - w < s <= t): a key range that moves with the
    # query, so its kernels bound the key loop by the window and its dK/dV by the queries s + w reaches. A flag of
    # its own (not "neither pooled nor gathered") so that a template asks for the window by what it is.
    windowed: bool = False

    @property
    def attention_kernel(self) -> str:
        return f"_{self.name}_attention_kernel"

    @property
    def backward_kernels(self) -> tuple[str, str]:
        return f"_{self.name}_bwd_dq_kernel", f"_{self.name}_bwd_dkdv_kernel"

    @property
    def decode_kernel(self) -> str:
        return f"_decode_{self.name}_kernel"

    @property
    def forward_config(self) -> str:
        """The launch-config entry (and tuning candidates) of its forward attention kernel."""
        return self.name

    @property
    def backward_configs(self) -> tuple[str, str]:
        """The launch-config entries of its backward dQ and dK/dV kernels."""
        return f"{self.name}_dq", f"{self.name}_dkdv"


# In launch order: the pooled keys and the compression branch's log-sum-exp feed the selection's scorer.
BRANCHES = (Branch("compression", "cmp", pooled=True), Branch("selection", "slc", gathered=True),
            Branch("window", "win", windowed=True))
BY_NAME = {b.name: b for b in BRANCHES}
# The templates' per-branch code is an if / elif over these flags: each branch is exactly one kind of key set.
assert all(b.pooled + b.gathered + b.windowed == 1 for b in BRANCHES), "a branch is pooled, gathered or windowed"
NAMES = tuple(b.name for b in BRANCHES)
assert set(NAMES) == set(SPEC_BRANCHES), "a branch the spec accepts must be declared here (and the reverse)"
# The call contract names each branch's own k/v inputs (k_cmp, v_slc, ...) with the same suffixes.
assert {b.name: b.short for b in BRANCHES} == SIGNATURE_SHORT, "branch suffixes: keep model/signature.py in step"


def branches_of(spec: Spec) -> tuple[Branch, ...]:
    """The spec's branches in launch order (its gate channel order is `spec.branches`)."""
    return tuple(b for b in BRANCHES if b.name in spec.branches)


def kernel_names() -> dict[str, tuple[str, str]]:
    """{kernel name: (branch, pass)} of every branch's attention kernels, forward then backward: the kernels whose
    time the benchmarks' per-kernel profile reports against the analysis' FLOPs of that branch and pass."""
    out = {b.attention_kernel: (b.name, "forward") for b in BRANCHES}
    out.update({k: (b.name, "backward") for b in BRANCHES for k in b.backward_kernels})
    # The selection's block-outer order (docs/selection_order.md): its attention kernel does the branch's forward
    # FLOPs (the merge only combines), its one backward kernel the whole backward's.
    out["_selection_kv_attention_kernel"] = ("selection", "forward")
    out["_selection_kv_bwd_kernel"] = ("selection", "backward")
    # The scatter backward (docs/backward.md): dQ, dK and dV of the branch in one kernel.
    out["_selection_bwd_scatter_kernel"] = ("selection", "backward")
    # Its split forms (tuning.scatter_variants' split_*): the scatter kernel for dQ, this one for dK and dV.
    out["_selection_bwd_scatter_dkdv_kernel"] = ("selection", "backward")
    return out
