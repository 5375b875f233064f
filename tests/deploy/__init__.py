"""Tests of the Ray Serve deployment."""
