"""A study: planning trials, running them (here, fused, on Ray, from several processes), storing them.

Usage::

    from loraplace.study.run import run_study
    records = run_study(StudyConfig.load("study.yaml"))      # resumable: finished trials are skipped

Modules: ``plan`` (strategies -> placements -> trials and their ids; torch-free), ``workspace`` (the model
and data every trial shares in one process), ``executor`` (where trials run, what a failure is),
``run`` (the study from start to end), ``store`` / ``claims`` / ``results`` (the database, who runs what,
the exports; torch-free), ``probe`` / ``probe_scores`` (the probe behind ``auto``), ``tracking`` (MLflow, W&B).
"""
