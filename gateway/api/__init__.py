"""api plane of the silent-monitoring gateway."""
