"""argrpo: RL post-training (pretrain, SFT, GRPO) for autoregressive text-to-image models.

The repository keeps one folder per part of the architecture (``grpo/``, ``rewards/``, ``rollout/``, ``recipes/``,
``models/``, ``data/``); setup.cfg's ``package_dir`` installs each of them under this package, so the wheel puts
``argrpo`` and nothing else at top level and ``from argrpo.rewards import ...`` is the one way to import them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("argrpo")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
