"""One refresh of a fixed model state, in as many processes as torchrun starts (or one): rank 0
saves what every process ends up holding, for tests/test_distributed.py.

    python tests/distributed_refresh.py OUT_FILE                     # one process
    torchrun --nproc-per-node 2 tests/distributed_refresh.py OUT_FILE
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.trainer import Trainer


def main(out_file: str) -> None:
    torch.set_num_threads(1)  # the same arithmetic in every process and in the single-process run
    out = Path(out_file)
    # MixNN+ correcting every sample (MixNN's correction) with ELR: the corrected targets and ELR's
    # running averages are both shared
    cfg = TrainConfig(dataset="digits", noise="symmetric_uniform", noise_rate=0.4, model="small_cnn",
                      method="mixnn_plus", plus_correction="all", plus_elr=3.0,
                      model_widths=[8, 16, 16, 16], epochs=3, warmup_epochs=1, correction_start=0, batch_size=64,
                      progress=False, tensorboard=False, out_dir=str(out.parent / f"run-{out.stem}"), num_threads=1,
                      neighbour_backend="exact")
    trainer = Trainer(cfg, overwrite=True)
    # the k-NN vote of MixNN+'s neighbour guard, computed by rank 0 and held by every process
    trainer.refresh_options = dataclasses.replace(trainer.refresh_options, given_vote=5)
    row = trainer.run_refresh(epoch=1)
    result, table = trainer.last_refresh, trainer.run.table
    held = {"clean_prob": result.clean_prob, "losses": result.losses, "ids": result.ids,
            "features": result.features, "anchors": table.anchors, "partners": table.partners,
            "weights": table.weights, "targets": trainer.targets.targets.clone(),
            "given_supported": trainer.run.given_supported.clone(),
            "early_targets": trainer.early_targets.values.clone(),
            "clean_auroc": torch.tensor(row["clean_auroc"]),
            # MixNN+'s chosen warm-up ends on this value: every process must decide alike
            "gmm_separation": torch.tensor(row["gmm_separation"])}
    # every process must hold the same: compare with rank 0's copy before saving
    for name, value in held.items():
        reference = trainer.dist.broadcast(value.clone())
        if not torch.equal(reference, value):
            raise SystemExit(f"rank {trainer.dist.rank} holds another {name} than rank 0")
    if trainer.dist.is_main:
        torch.save(held, out)
    del row, result, table, held
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1])
