"""Thin entrypoints (`python -m jobs.<stage>`): parse config, build, run. The logic lives in `inbol_ray`."""
