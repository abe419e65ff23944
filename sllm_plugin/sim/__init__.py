"""The fleet simulator (`sllm simulate`): a discrete-event model of servers, tiers and replicas
driven by a request trace, making its decisions with the router's own policy code
(`sllm_plugin.router.policy`). It never imports torch, the format or the loader."""
