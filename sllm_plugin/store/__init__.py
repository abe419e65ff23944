"""The node daemon, `sllm node`: a multi-tier checkpoint store and replica launcher per server.

Modules, from the bottom up:
- `names`: model names and the directory each gets inside a tier (no escaping the tier);
- `config`: the daemon's configuration (YAML file, then flags), defaults that run on a laptop;
- `bandwidth`: per-tier read bandwidth, calibrated at start-up and refined from real loads;
- `tiers`: one directory with a byte capacity, LRU eviction, pins, and rediscovery on restart;
- `sources`: getting a model from where it lives (hub id, path, URL) into a tier, converted;
- `jobs`: one queue per tier that runs its fetches and promotions one at a time;
- `replicaargs`: the vLLM flags the API may pass to a replica, and secrets kept out of logs;
- `replicas`: device inventory and vLLM replica processes, their phases and health;
- `statedir`: the daemon's private state directory, locked by one daemon, written atomically;
- `node`: the service tying those together; `api`: its HTTP API (FastAPI), behind
  `httpguard` (Host header check, request body limit).

Nothing here imports torch: the daemon moves files and runs processes; the replicas load.
"""
