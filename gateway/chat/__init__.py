"""chat plane of the silent-monitoring gateway."""
