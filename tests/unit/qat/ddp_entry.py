"""torchrun entry for the DDP tests: the `lowbit-deploy` CLI, with every rank but 0 unable to put a file in place.

Every artifact the trainer writes goes through ``os.replace`` (temp file + rename, lowbit_deploy/io.py), so a rank
that tried to write a checkpoint, train state or report fails the run instead of silently racing rank 0.
"""

import os
import sys

if os.environ.get("RANK", "0") != "0":
    def _refuse(source, target, *args, **kwargs):
        raise AssertionError(f"rank {os.environ['RANK']} tried to write {target}; only rank 0 writes")

    os.replace = _refuse
    os.rename = _refuse

from lowbit_deploy.cli import main  # noqa: E402

sys.exit(main())
