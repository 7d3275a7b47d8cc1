"""Stages of a recipe and the driver that runs them in order."""
