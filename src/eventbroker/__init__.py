"""eventbroker: an event delivery gateway."""
