"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: one rank of `headct pretrain` (the job's
own entry point, gloo backend on CPU, two micro-batches per step so DDP's no_sync path runs), then this rank's final
weight digest written to <root>/rank<R>.txt."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.pretrain import run  # noqa: E402
from tests.pretrain_helpers import ctx_for, make_cfg  # noqa: E402

root = Path(sys.argv[1])
out = run(make_cfg(root, samples=16, batch_size=2, accum_steps=2, checkpoint_every=2), ctx_for(root))
Path(root / f"rank{os.environ['RANK']}.txt").write_text(out["weights_sha256"])
