"""The discrete-event simulator: an op stream timed on a hardware profile."""
