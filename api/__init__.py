"""The management REST API (aiohttp): routes, auth and thin handlers over the policyd core."""
