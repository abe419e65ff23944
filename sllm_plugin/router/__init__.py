"""The router sidecar, `sllm router`: an OpenAI-compatible proxy in front of node daemons.

Modules:
- `config`: YAML + flags (nodes, models with their sources and limits, request limits);
- `policy`: placement (estimated startup per node), warm routing (prefix affinity against load)
  and the migration cost model; pure functions over plain data, no I/O, so the simulator can
  drive the same code with a simulated clock;
- `prefix`: prompt block hashes for prefix-cache affinity;
- `cluster`: the node daemons as the router sees them (polled status, replica start and stop);
- `streams`: every proxied request as tokens (prompt ids, generated ids), its upstream stream,
  and token-based live migration / failover;
- `autoscaler`: scale from zero, scale up under load, stop idle replicas after a keep-alive;
- `metrics`: the Prometheus metrics; `app`: the HTTP API (FastAPI).

Nothing here imports torch, the loader or the format: the router knows models by the sizes and
tiers the node daemons report and talks HTTP to them and to replicas.
"""
