"""fedtreelora on Flower: a ServerApp that drives any fedtreelora strategy and a ClientApp that runs
the same client code as the in-process engine.

* :mod:`.server_app` -- ``app``, the ServerApp (``fedtreelora.engines.flower.server_app:app``).
* :mod:`.client_app` -- ``app``, the ClientApp (``fedtreelora.engines.flower.client_app:app``).
* :mod:`.project` -- writes a Flower app folder (``pyproject.toml``) that ``flwr run`` accepts.
* :mod:`.launch` -- starts a local SuperLink in simulation mode and submits a run (``fedtreelora flower``).
* :mod:`.secure` and :mod:`.slots` -- secure aggregation of cluster experts with SecAgg+
  (``privacy.secure_aggregation``).

Only adapter tensors (``ArrayRecord``) and scalars (``ConfigRecord`` / ``MetricRecord``) cross the
wire; text and labels never leave a node.
"""
