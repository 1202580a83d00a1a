"""Kubernetes: object builders, the project spawner and the project controller."""
