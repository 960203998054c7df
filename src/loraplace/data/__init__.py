"""Data: examples from files, the hub or the built-in set; tokens with target-only labels; batches.

Usage::

    from loraplace.data.sources import train_eval_examples
    from loraplace.data.tokenize import tokenize
    from loraplace.data.batches import batches
    train, evals = train_eval_examples(spec)          # spec: core.config.DataSpec
    ts = tokenize(train, tokenizer, spec)
    for batch in batches(ts, 8, seed=0, pad_id=tokenizer.pad_token_id): ...

Modules: ``examples`` (the formats and their plain templates), ``sources`` (files, hub, built-in; the
train/eval split), ``builtin`` (the default dataset), ``tokenize`` (labels on targets only, chat
templates), ``batches`` (right-padded batches; the only one that imports torch), ``answers`` (checkable
answers and exact match).
"""
