"""The study database: its schema, the trial records, which process runs which trial, the keys of the values a
study caches, and the flat exports.

Torch-free: the read-only commands (``status``, ``report``, ``export``) read it without importing torch.
"""
