"""aiohttp glue: routes, websockets, the built-in page, and what a peer may hold."""
