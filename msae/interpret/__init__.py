"""The interpretation half of the paper (docs/interpret.md): linear-probe fidelity, concept naming
and seed alignment. Pure torch/numpy; the CLI and the sweep call these."""
