"""policy plane of the silent-monitoring gateway."""
