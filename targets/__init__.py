"""Target presets (*.json), installed as the data package `repq_tvm._presets` (see pyproject.toml and
`repq_tvm.targets.preset_dir`)."""
