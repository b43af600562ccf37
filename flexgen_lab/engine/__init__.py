"""The engine: policies, tiers, schedules and the generation loop that executes them."""
