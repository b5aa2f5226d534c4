"""The gateway's own HTTP/1.1 front for the model endpoints (`protocol`), aiohttp behind it."""
