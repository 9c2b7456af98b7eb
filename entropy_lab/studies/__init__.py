"""entropy_lab.studies: reproducible experiments behind the README's claims, one module each.

- ``coupling``: why the tabular closed forms fail on a network: tightness of every
  estimator against tokens per update and learning rate, under SGD and AdamW.
"""

from entropy_lab.studies.coupling import CouplingStudyConfig, run_coupling_study, study_table

__all__ = ["CouplingStudyConfig", "run_coupling_study", "study_table"]
