"""argrpo: RL post-training (pretrain, SFT, GRPO) for autoregressive text-to-image models.

The repository keeps one folder per part of the architecture (``grpo/``, ``rewards/``, ``rollout/``, ``recipes/``,
``models/``, ``data/``); setup.cfg's ``package_dir`` installs each of them under this package, so the wheel puts
``argrpo`` and nothing else at top level and ``from argrpo.rewards import ...`` is the one way to import them.

The modules here are the few every part uses: ``config`` (dataclass configs from YAML and ``--set`` overrides),
``errors`` (the user errors the CLI prints as one line), ``registry`` (every named, pluggable thing), ``jsonl``
(JSON rows with errors naming file and row), ``grids`` (image grids) and ``cluster`` (Ray).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("argrpo")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
