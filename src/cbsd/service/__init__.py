"""`cbsd serve`: the long-running service (issue 24) -- the REST API with its operations and
event stream, the runner of scheduled checkpoints, Prometheus metrics and the web UI. It acts
through the same core, locks and inventory as the CLI; the CLI never needs it."""
