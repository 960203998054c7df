"""The study database: its schema, the trial records, which process runs which trial, and the flat exports.

Torch-free: the read-only commands (``status``, ``report``, ``export``) read it without importing torch.
"""
