"""Scalar logging of a run to TensorBoard (and Weights & Biases when installed and asked for)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from fedtreelora.runfolder import Convention, RoundRecord, RunFolder


class ScalarLogger:
    """Per-round scalars: mean (headline, and under each evaluation convention) and per-client metric
    (accuracy, or rouge1 for generation), loss, communication, the cuts, and with ``privacy`` on the
    epsilon spent so far (``privacy/epsilon``, ``privacy/epsilon_server``; absent while infinite).

    TensorBoard event files go to ``out_dir/tensorboard``; ``wandb=True`` also logs to a W&B run
    (requires the ``wandb`` package and its own login; ignored with a notice if not installed).

    ``first_step`` is the 1-based step of the first round this process logs (a resumed run: the
    checkpoint's round + 1). From it on, TensorBoard hides what an earlier process of the run logged,
    so rounds it logged after its last checkpoint appear once, as the run's metrics have them; 0 keeps
    every earlier event.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        tensorboard: bool,
        wandb: bool,
        run_name: str,
        config: dict[str, Any],
        first_step: int = 0,
    ) -> None:
        self.writer = None
        self.wandb_run = None
        self.notice = ""
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step writes a restart marker: readers drop older events at or after that step.
            purge_step = first_step if first_step > 0 else None
            self.writer = SummaryWriter(log_dir=str(RunFolder(out_dir).tensorboard), purge_step=purge_step)
        if wandb:
            if importlib.util.find_spec("wandb") is None:
                self.notice = "logging.wandb is set but the wandb package is not installed; skipping W&B"
            else:
                import wandb as wandb_module

                self.wandb_run = wandb_module.init(name=run_name, config=config, dir=str(out_dir))

    def log_round(self, record: dict[str, Any], per_client: list[float | None]) -> None:
        """One round's record (as in the run summary's history) and each client's metric."""
        round_record = RoundRecord(record)
        step = round_record.round + 1
        metric = record.get("metric", "accuracy")
        scalars = {
            f"{metric}/mean": round_record.mean,
            **{f"{metric}/mean_{c.value}": round_record.convention_mean(c) for c in Convention},
            "train_loss/mean": round_record.mean_train_loss,
            "communication/uplink_mb_per_client": round_record.uplink_mb,
            "communication/downlink_mb_per_client": round_record.downlink_mb,
            "privacy/epsilon": round_record.epsilon,
            "privacy/epsilon_server": round_record.epsilon_server,
        }
        scalars.update({f"{metric}/client_{k:03d}": value for k, value in enumerate(per_client)})
        scalars = {k: v for k, v in scalars.items() if v is not None}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
