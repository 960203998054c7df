"""Training: one trial's lifecycle and the two engines that drive it.

Usage::

    from loraplace.train import segments
    trials = [segments.begin(setup, placement, seed)]                # setup: train.trial.Setup
    segments.run_to(setup, trials, until=setup.total_steps)          # fused=True: several trials over one base pass
    # a study runs trials through study.executor (run_one / run_group), which also evaluates and finishes them

Modules: ``trial`` (a running trial's state: adapters, AdamW, RNG, step, and its variant's hooks),
``checkpoint`` (save and restore), ``result`` (its metrics and TrialResult), ``segments`` (a piece of work on
either engine), ``sequential`` and ``fused`` (how a step's rows go through the frozen base), ``loss`` (the loss
on target positions only), ``schedule`` (steps and learning rate), ``prefix`` (frozen-prefix reuse),
``progress`` (the step bar), ``memory`` (device memory readings, checkpointing on and off), ``guard`` (the base
stays unchanged), ``generate`` (greedy generation and accuracy).
"""
