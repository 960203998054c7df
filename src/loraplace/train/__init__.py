"""Training: one trial's lifecycle and the two engines that drive it.

Usage::

    from loraplace.train.trial import Setup, Trial
    from loraplace.train import sequential, fused
    setup = Setup(model, train_set, eval_set, train_spec, eval_spec, pad_id)
    result = sequential.run_trial(setup, placement, seed=0)          # start, advance, evaluate, finish
    results = fused.run_fused_trials(setup, placements, seeds)       # several trials over one base pass

Modules: ``trial`` (a running trial's state: adapters, AdamW, RNG, step; checkpoint and restore),
``sequential`` and ``fused`` (how a step's rows go through the frozen base), ``loss`` (the loss on target
positions only), ``schedule`` (steps and learning rate), ``prefix`` (frozen-prefix reuse), ``memory``
(device memory readings, checkpointing on and off), ``guard`` (the base stays unchanged), ``generate``
(greedy generation and accuracy).
"""
