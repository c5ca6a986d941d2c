"""The routing layer: one OpenAI endpoint over many model groups, each a set of deployments (engines in this process
and remote OpenAI-compatible servers), with retries, fallbacks, cooldowns and cost/latency routing.

config.py reads the LiteLLM-shaped YAML; router.py holds the routing rule; server.py serves it over HTTP
(``fastinfer serve --config``); entrypoints/cli/batch_routed.py runs batch files through it
(``fastinfer generate --config``)."""
