"""loraplace: controlled studies of where LoRA adapters should go in a causal LM.

Usage: ``loraplace inspect``, ``loraplace plan``, ``loraplace study``, ``loraplace report STUDY_DIR``.
"""

__version__ = "0.1.0"
