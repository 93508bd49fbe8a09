"""Design-space studies: sweeps, fidelity metrics, reports."""
