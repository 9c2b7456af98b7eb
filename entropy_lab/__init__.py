"""entropy-lab: why the policy's entropy moves in RLVR, token by token."""

__version__ = "0.1.0"
