"""gateway plane of the silent-monitoring gateway."""
