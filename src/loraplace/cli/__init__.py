"""The command line: a thin layer over the public API, the only place besides the store that touches argv and disk.

Usage::

    loraplace inspect [--model M] [--json]
    loraplace plan [--model M] [--strategies S,S,...] [--budget B] [--json] [key=value ...]
    loraplace study [CONFIG.yaml] [key=value ...]
    loraplace probe [CONFIG.yaml] [key=value ...] [--all]
    loraplace status STUDY_DIR [--csv | --json]
    loraplace report STUDY_DIR
    loraplace export STUDY_DIR --strategy S --format peft|axolotl|llamafactory|torchtune

Importing it imports neither torch nor the modules that do: each command imports what it needs, so the
read-only commands (``status``, ``report``, ``export``) start in a fraction of a second.
"""

from loraplace.cli.main import build_parser, main  # noqa: F401
