"""Hardware profiles: capacities and speeds of a machine, from presets or calibration."""
