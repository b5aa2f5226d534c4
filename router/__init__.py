"""prefix-router: a prefix-cache-aware OpenAI gateway for fleets of vLLM workers."""

__version__ = "0.1.0"
