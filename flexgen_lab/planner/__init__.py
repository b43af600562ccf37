"""Cost model and policy search: predictions of what the engine will do, and the LP over them."""
