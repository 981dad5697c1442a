"""The fedtreelora ServerApp (``fedtreelora.engines.flower.server_app:app``)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtreelora.engines.flower.server import FlowerEngine
from fedtreelora.engines.flower.settings import FlowerRunSettings

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment in the run config over the connected nodes."""
    settings = FlowerRunSettings.from_run_config(context.run_config)
    FlowerEngine(
        settings.experiment,
        grid,
        settings.out_dir,
        round_timeout=settings.round_timeout,
        node_wait_timeout=settings.node_wait_timeout,
        collect_states=settings.collect_states,
    ).run()
