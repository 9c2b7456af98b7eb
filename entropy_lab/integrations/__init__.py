"""Integrations with the training engines people already run (optional extras).

Each submodule imports its engine lazily and checks the engine's version on first use,
so ``import entropy_lab`` never needs TRL or verl installed.
"""
