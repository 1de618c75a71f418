"""The client side: the victim's update, its defenses, and the observation file the server receives."""
