"""falcon_core package."""
