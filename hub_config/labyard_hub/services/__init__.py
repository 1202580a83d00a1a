"""Hub services of Labyard (each runs as its own process, managed by the hub)."""
