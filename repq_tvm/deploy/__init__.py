"""Deployment: artifacts, the runtime, profiling, cross-compilation and the device-side runner."""
