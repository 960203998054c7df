"""Study-level measurements made once per study on the shared base model: the probe's scores, EVA's
initialisation, KappaTune's order, the forgetting set and the zero-shot evaluation. Each is kept in the study
database under a key of what it depends on (``store.keys``), so a rerun reuses it and a changed dependency
measures again.
"""
