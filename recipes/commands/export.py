"""`argrpo export CHECKPOINT OUT`: a training checkpoint -> a consolidated policy directory.

A sharded (FSDP2) checkpoint holds each learner process's shards (torch.distributed.checkpoint); the export reads
them in one process, no process group needed, and writes a policy directory that ``transformers`` loads
(``AutoModelForCausalLM.from_pretrained(OUT)``; a LoRA run gives its adapter beside the base it names) and every
argrpo command takes as ``policy.checkpoint``. An unsharded checkpoint is rewritten the same way.
"""

from __future__ import annotations

import argparse

from argrpo.recipes.commands import command


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory (GRPO: <output_dir>/checkpoints/step-N; "
                                           "pretrain/SFT: <output_dir>/checkpoint-N)")
    parser.add_argument("out", help="policy directory to write (replaced atomically if it exists)")


@command("export", help="write a checkpoint (sharded or not) as a consolidated policy directory",
         configure=_configure)
def run(args) -> int:
    from pathlib import Path

    from argrpo.errors import MissingFileError
    from argrpo.grpo.checkpointing import RUN_FILE, export_checkpoint

    path = Path(args.checkpoint)
    if not (path / RUN_FILE).is_file() and not (path / "trainer_state.json").is_file():
        raise MissingFileError(f"{path}: not a training checkpoint (no {RUN_FILE} or trainer_state.json)")
    out = export_checkpoint(path, args.out)
    print(f"wrote {out}")
    return 0
