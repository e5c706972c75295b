"""The HTTP service (BentoML): endpoints, micro-batching, settings, URL fetching, HTTP guards."""
