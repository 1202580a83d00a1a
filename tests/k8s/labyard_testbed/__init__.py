"""The Labyard Kubernetes testbed (tests/k8s): control script, API client and pod runner."""
