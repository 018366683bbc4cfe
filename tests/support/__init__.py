"""Test support: servers, the service stack harness, checkpoint factories, float64 references."""
